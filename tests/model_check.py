"""Shared numerics checks for every family: our layers vs a reference model.

`pipeline_forward` runs our pipeline on `len(parts)` gloo ranks through DeepSpeed's engine and
returns (loss, logits) from the last stage; `sequential_forward` runs the same layers in one
process. Both take the per-layer state dict of our checkpoint layout ("<layer>.<param>").
"""
from __future__ import annotations

import torch

from tests.dist import run_ranks


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return labels


def _pipeline_rank(family_name, hf_config, state, parts, ids, labels):
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from engine.distributed import init_distributed
    from models import get_family
    from models.blocks import LayerOptions
    from models.pipeline import build_pipeline

    init_distributed()
    family = get_family(family_name)
    args = family.Args.from_hf_config(hf_config)
    module = build_pipeline(family, args, LayerOptions(), PipeDataParallelTopology(num_pp=len(parts), num_dp=1),
                            parts, seed=1)
    for idx, layer in enumerate(module.forward_funcs):
        if hasattr(layer, "state_dict"):
            prefix = f"{idx + module._local_start}."
            layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    engine, *_ = deepspeed.initialize(model=module, config={"train_micro_batch_size_per_gpu": ids.shape[0],
                                                             "gradient_accumulation_steps": 1})
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    n = (labels != -100).sum()
    batch = ((ids, pos), (labels, torch.tensor(1.0) / n))
    loss, logits = engine.eval_batch(iter([batch]), return_logits=True)
    return float(loss), (logits.detach() if logits is not None else None)


def pipeline_forward(family_name: str, hf_config: dict, state: dict, parts: list[int], ids: torch.Tensor,
                     labels: torch.Tensor):
    """(loss, logits) of our DeepSpeed pipeline split as `parts` (one rank per stage)."""
    results = run_ranks(_pipeline_rank, len(parts), family_name, hf_config, state, parts, ids, labels)
    return results[-1]


def sequential_forward(family_name: str, hf_config: dict, state: dict, ids: torch.Tensor, labels: torch.Tensor):
    from models import get_family
    from models.pipeline import SequentialModel, make_loss

    family = get_family(family_name)
    args = family.Args.from_hf_config(hf_config)
    model = SequentialModel(family, args).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        out = model(ids)
        n = (labels != -100).sum()
        loss = make_loss(family, args)(out, (labels, torch.tensor(1.0) / n))
    return float(loss), out
