"""Pipeline training on 2 gloo ranks: it learns, and stop + resume replays the same losses bitwise."""
import json
from pathlib import Path

import pytest

from engine.config import from_dict
from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parent.parent
DATA = [str(p) for p in sorted((ROOT / "examples" / "data").glob("*.json*"))]


def config(model_path, save_path, dims=(2, 1), parts=(3, 3), steps=6, **over) -> dict:
    raw = {"model_path": str(model_path), "data_path": DATA, "save_path": str(save_path), "max_seq_len": 64,
           "n_epochs": 50, "max_steps": steps, "packing": True, "seed": 7,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": list(dims)},
                          "parts": list(parts) if parts else "auto"},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0,  # up to optimizer.params.lr
                                                        "warmup_num_steps": 2}}}
    raw.update(over)
    return raw


def _train(raw):
    from engine.training.loop import train

    result = train(from_dict(raw))
    return result.losses


def run(raw) -> dict[int, float]:
    losses = run_ranks(_train, 2, raw)
    assert losses[0] == losses[1]  # every rank reports the pipeline's loss
    return losses[0]


@pytest.mark.parametrize("dims, parts", [((2, 1), (3, 3)), ((1, 2), (6,))], ids=["pp2", "dp2"])
def test_loss_decreases(tiny_pp, tmp_path, dims, parts):
    losses = run(config(tiny_pp, tmp_path / "run", dims, parts, steps=12))
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (11, 12)) / 2
    assert last < first - 0.3, losses
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all(m["tokens_per_s_per_gpu"] > 0 and m["grad_norm"] > 0 for m in metrics)
    saved = tmp_path / "run" / "global_step12"
    assert (tmp_path / "run" / "latest").read_text() == "global_step12"
    assert (saved / "config.yml").is_file() and len(list(saved.glob("layer_*-model_states.pt"))) == 6


@pytest.mark.parametrize("precision", [
    {},
    {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}},
    {"bf16": {"enabled": True}},
    {"optimizer": {"type": "Lion", "params": {"lr": 3e-4, "betas": [0.9, 0.99]}}},
], ids=["fp32", "bf16-zero1", "bf16", "lion"])
def test_resume_is_bitwise_identical(tiny_pp, tmp_path, precision):
    full = run(config(tiny_pp, tmp_path / "full", **precision))
    first = run(config(tiny_pp, tmp_path / "split", steps=3, **precision))
    second = run(config(tiny_pp, tmp_path / "split", steps=6, **precision))
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]  # second run resumed, did not restart
    assert {**first, **second} == full  # exact float equality, step by step


def test_bf16_gradients_accumulate_in_fp32(tiny_pp, tmp_path):
    from engine.training.deepspeed_setup import deepspeed_config

    bf16 = {"bf16": {"enabled": True}}
    ds = deepspeed_config(from_dict(config(tiny_pp, tmp_path, **bf16)))
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"]["immediate_grad_update"] is True
    assert ds["zero_optimization"]["stage"] == 1  # -> DeepSpeed's BF16_Optimizer with fp32 gradient buffers
    own = deepspeed_config(from_dict(config(tiny_pp, tmp_path, data_types={"grad_accum_dtype": "bf16"}, **bf16)))
    assert own["data_types"] == {"grad_accum_dtype": "bf16"} and "immediate_grad_update" not in own["bf16"]
    assert "data_types" not in deepspeed_config(from_dict(config(tiny_pp, tmp_path, **bf16)), pipeline=False)
    assert "data_types" not in deepspeed_config(from_dict(config(tiny_pp, tmp_path)))  # fp32 run
    # adding each gradient into the fp32 buffer as backward produces it (the default) gives exactly
    # what adding them after each micro-batch's backward gives
    default = run(config(tiny_pp, tmp_path / "a", steps=3, **bf16))
    after_backward = run(config(tiny_pp, tmp_path / "b", steps=3, data_types={"grad_accum_dtype": "fp32"}, **bf16))
    assert default == after_backward


def test_train_straight_from_hf_dir_and_from_scratch(tiny_pp, tmp_path):
    hf_dir = Path(tiny_pp).parent / "hf"
    from_pp = run(config(tiny_pp, tmp_path / "a", steps=2))
    from_hf = run(config(hf_dir, tmp_path / "b", steps=2))
    assert from_hf == from_pp  # same weights whether converted first or read per stage from HF shards
    scratch = run(config(hf_dir, tmp_path / "c", steps=2, from_scratch=True))
    assert abs(scratch[1] - from_pp[1]) > 1e-3  # random init really replaced the checkpoint's weights
    assert (tmp_path / "b" / "hf" / "config.json").is_file()  # export-ready: pp_to_hg finds config + tokenizer


def test_moe_aux_and_router_z_loss_reach_the_metrics_under_pp(tmp_path):
    """pp=2 mixtral with router_z_loss_coef: aux_loss and router_z_loss are computed on the last
    stage and logged by rank 0, the parts add up to the loss, and step 1's router_z_loss equals
    the single-process model's on the same micro-batches."""
    import torch

    from engine.checkpoints.convert import hf_to_pp
    from engine.checkpoints.weights import open_weights
    from engine.model import Model
    from engine.training.loop import build_data
    from models.pipeline import SequentialModel
    from models.tiny import make_tiny_hf_model, sample_texts

    make_tiny_hf_model(tmp_path / "hf", "mixtral", sample_texts(DATA))
    hf_to_pp(tmp_path / "hf", tmp_path / "pp")
    z_coef = 0.05
    raw = config(tmp_path / "pp", tmp_path / "run", steps=2, router_z_loss_coef=z_coef)
    losses = run(raw)
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    coef = json.loads((tmp_path / "hf" / "config.json").read_text())["router_aux_loss_coef"]
    for m in metrics:  # logged on rank 0 (first stage); computed on the last stage
        assert m["aux_loss"] > 0.5 and m["lm_loss"] > 1.0 and m["router_z_loss"] > 0
        assert abs(m["loss"] - losses[m["step"]]) < 1e-6
        parts = m["lm_loss"] + coef * m["aux_loss"] + z_coef * m["router_z_loss"]
        assert abs(m["loss"] - parts) < 1e-4  # the parts add up to the loss

    cfg = from_dict(raw)  # single process: the whole model on step 1's micro-batches, weights as loaded
    model = Model.for_training(cfg)
    _, loader = build_data(cfg, model, 0, 1)
    seq, source = SequentialModel(model.family, model.args).eval(), open_weights(tmp_path / "pp")
    for i, layer in seq.owned_layers():
        layer.load_state_dict(source.layer(i))
    with torch.no_grad():
        zs = [seq(*inputs)[2].item() for inputs, _ in loader.micro_batches(0)]
    assert abs(metrics[0]["router_z_loss"] - sum(zs) / len(zs)) < 1e-5
