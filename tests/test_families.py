"""Checks every registered family gets (models/__init__.py FAMILIES): a new family's registry line
brings them. Per-family files (test_models_*.py) keep only their quirks.

Reference: the family's HF model loaded from the same dir by AutoModelForCausalLM: transformers'
own class (llama, bloom, mixtral) or our remote code (baichuan, chatglm, whose modeling files
are checked against independent references in their own test files). Every weight is perturbed
(norms and biases too), so a misplaced one shows. fp32, atol 1e-5.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models import family_names, get_family
from models.attention import AttnOptions
from models.block_base import LayerOptions
from models.keymap import model_from_hf
from models.pipeline import SequentialModel, flat_layers, layer_groups, make_loss
from tests.dist import run_ranks
from tests.model_check import shifted_labels

FAMILIES = family_names()
ATOL = 1e-5
LR = 1.0
SEQ = 16


def make_hf_dir(name: str, out: Path) -> Path:
    """The family's tiny HF model (config, tokenizer, remote code where needed) with every weight perturbed."""
    from models.tiny import make_tiny_hf_model

    make_tiny_hf_model(out, name, seed=0)
    model = load_reference(out)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    if getattr(model.config, "router_aux_loss_coef", None):  # large: a wrongly normalised router loss shows
        model.config.router_aux_loss_coef = 0.5
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """hf_dir(name): the family's HF dir, built once per module."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_hf_dir(name, root / name)
        return built[name]
    return get


def load_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def reference_out(model, ids, labels=True):
    moe = {"output_router_logits": True} if getattr(model.config, "num_local_experts", 0) else {}
    return model(input_ids=ids, labels=ids if labels else None, use_cache=False, **moe)


def ours(path: Path, opts: LayerOptions = LayerOptions()):
    """Our SequentialModel with the dir's weights (through the one weight loader) and its loss."""
    from engine.checkpoints.weights import open_weights

    source = open_weights(path)
    family, args = source.model.family, source.model.args
    model = SequentialModel(family, args, opts).eval()
    for idx, layer in model.owned_layers():
        layer.load_state_dict(source.layer(idx))
    return model, make_loss(family, args), source.model


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits_of(out):
    return out[0] if isinstance(out, tuple) else out  # an MoE head also returns its aux loss


def batch(vocab: int, seed: int, b: int = 2):
    ids = torch.randint(3, vocab, (b, SEQ), generator=torch.Generator().manual_seed(seed))
    labels = shifted_labels(ids)
    return ids, labels, torch.tensor(1.0) / (labels != -100).sum()


@pytest.mark.parametrize("name", FAMILIES)
def test_dims_describe_the_layers(name):
    """family.dims (what planning and MFU read) against the parameters the layers really have."""
    from engine.model import expected_shapes

    family = get_family(name)
    args = family.Args.from_hf_config(family.tiny_hf_config())
    d, shapes, groups = family.dims(args), expected_shapes(family, args), layer_groups(family, args)
    assert len(groups) == d.n_layers + 2
    assert [tuple(s) for s in shapes[0].values()][0] == (d.vocab, d.hidden)
    assert any(x.tie for x in groups[0]) == d.tied
    block = sum(math.prod(s) for s in shapes[len(groups[0])].values())
    matmuls = 2 * d.hidden * (d.q_dim + d.kv_dim) + max(d.experts, 1) * d.mlp_params + d.experts * d.hidden
    assert matmuls <= block <= matmuls + 16 * d.hidden, (block, matmuls)  # + norms and biases
    assert d.positional in ("rope", "alibi") and 0 < d.norm_eps < 1e-3 and d.top_k <= d.experts


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_loss_match_reference(hf_dir, name):
    model, loss_fn, desc = ours(hf_dir(name))
    ids, labels, scale = batch(desc.dims.vocab, seed=1)
    with torch.no_grad():
        ref = reference_out(load_reference(hf_dir(name)), ids)
        out = model(ids)
        loss = loss_fn(out, (labels, scale))
    assert ref.logits.abs().max() > 1  # random enough that a wrong layout could not pass
    torch.testing.assert_close(logits_of(out), ref.logits, atol=ATOL, rtol=0)
    assert abs(float(loss) - float(ref.loss)) < ATOL  # MoE: transformers adds coef x router loss too


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_row_equals_documents_alone(hf_dir, name):
    packed, _, desc = ours(hf_dir(name), LayerOptions(attn=AttnOptions(packed=True)))
    plain, _, _ = ours(hf_dir(name))
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(4, desc.dims.vocab, (n,), generator=g) for n in (7, 12, 5)]
    ids, pos = torch.cat(docs)[None], torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        row, start = logits_of(packed(ids, pos))[0], 0
        for d in docs:
            torch.testing.assert_close(row[start:start + len(d)], logits_of(plain(d[None]))[0], atol=ATOL, rtol=0)
            start += len(d)
        assert not torch.allclose(logits_of(plain(ids, pos))[0], row, atol=1e-3)  # the document mask matters


# ------------------------------------------------------------------ pp=2: eval + one optimizer step
def _micro_batches(vocab: int):
    """Two micro-batches of one global step (scale = gas / answer tokens) and an eval batch."""
    mbs, n = [], 0
    for seed in (3, 4):
        ids, labels, _ = batch(vocab, seed)
        mbs.append(((ids, torch.arange(SEQ).expand_as(ids)), labels))
        n += int((labels != -100).sum())
    scale = torch.tensor(len(mbs) / n)
    (ids0, pos0), labels0 = mbs[0]
    return mbs, n, [(inp, (labels, scale)) for inp, labels in mbs], ((ids0, pos0), (labels0, 1.0 / (labels0 != -100).sum()))


def _pipeline_rank(jobs: dict):
    """One rank, every family in turn: a 2-stage pipeline (embedding + block 0 | the rest; a tied
    head lives on the other stage) loaded by the training loader, eval of one batch, then one SGD
    step over two micro-batches. Per family: the last stage's eval loss/outputs, the loss metrics
    after eval and after the step, the step loss, and every local layer's weights after the step."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from engine.checkpoints.weights import load_stage
    from engine.distributed import init_distributed
    from engine.model import Model
    from models.pipeline import build_pipeline

    init_distributed()
    results = {}
    for name, (path, eval_batch, micro_batches) in jobs.items():
        model = Model.from_dir(path)
        parts = [2, model.n_layers - 2]
        module = build_pipeline(model.family, model.args, LayerOptions(), PipeDataParallelTopology(num_pp=2, num_dp=1),
                                parts, seed=1)
        load_stage(module, path, model)
        engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=LR),
                                          config={"train_micro_batch_size_per_gpu": eval_batch[0][0].shape[0],
                                                  "gradient_accumulation_steps": len(micro_batches),
                                                  "gradient_clipping": 0.0})  # DeepSpeed's default clips at 1
        pop = getattr(module.loss_fn, "pop_metrics", dict)
        loss, outputs = engine.eval_batch(iter([eval_batch]), return_logits=True, num_micro_batches=1)
        metrics = [pop()]
        step_loss = engine.train_batch(iter(micro_batches))
        metrics.append(pop())
        after = {}
        for idx, f in enumerate(module.forward_funcs):  # a tied twin is partial(forward_fn, tied module)
            layer = f.args[0] if isinstance(f, partial) else f
            if isinstance(layer, torch.nn.Module):
                after.update({f"{idx + module._local_start}.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
        if outputs is not None:
            outputs = tuple(t.detach() for t in outputs) if isinstance(outputs, tuple) else outputs.detach()
        results[name] = dict(loss=float(loss), outputs=outputs, metrics=metrics, step_loss=float(step_loss), after=after)
    return results


@pytest.fixture(scope="module")
def pipeline_runs(hf_dir):
    """All families' pp=2 runs in ONE 2-rank launch (process start-up dominates each run)."""
    from engine.model import Model

    jobs = {}
    for name in FAMILIES:
        _, _, micro_batches, eval_batch = _micro_batches(Model.from_dir(hf_dir(name)).dims.vocab)
        jobs[name] = (str(hf_dir(name)), eval_batch, micro_batches)
    ranks = run_ranks(_pipeline_rank, 2, jobs)
    return {name: [r[name] for r in ranks] for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_pipeline_eval_and_step_match_reference(hf_dir, pipeline_runs, name, tmp_path):
    """pp=2: eval logits/loss equal the reference; one SGD step over 2 micro-batches equals the
    reference's step on sum(token CE) / answer tokens (+ coef x mean router loss for MoE): the
    tied weight's gradient summed over both uses and both copies equal, a router's aux gradient
    crossing stages."""
    from engine.model import Model

    desc = Model.from_dir(hf_dir(name))
    first, last = pipeline_runs[name]
    mbs, n, _, eval_batch = _micro_batches(desc.dims.vocab)
    ids0 = eval_batch[0][0]
    hf = load_reference(hf_dir(name))
    with torch.no_grad():
        ref = reference_out(hf, ids0)
    torch.testing.assert_close(logits_of(last["outputs"]), ref.logits, atol=ATOL, rtol=0)
    assert abs(last["loss"] - float(ref.loss)) < ATOL
    if getattr(ref, "aux_loss", None) is not None:  # the loss's own metrics (MoE: router loss)
        assert abs(last["metrics"][0]["aux_loss"] - float(ref.aux_loss)) < ATOL

    ce, auxes = 0.0, []
    for (ids, _), labels in mbs:
        out = reference_out(hf, ids, labels=False)
        ce = ce + F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="sum")
        if getattr(out, "aux_loss", None) is not None:
            auxes.append(out.aux_loss)
    objective = ce / n + (hf.config.router_aux_loss_coef * sum(auxes) / len(mbs) if auxes else 0.0)
    objective.backward()
    assert abs(last["step_loss"] - objective.item()) < ATOL
    if auxes:  # summed over the step's micro-batches
        assert abs(last["metrics"][1]["aux_loss"] - sum(a.item() for a in auxes)) < ATOL
        assert abs(last["metrics"][1]["lm_loss"] - (ce * len(mbs) / n).item()) < ATOL
    with torch.no_grad():
        for p in hf.parameters():
            p -= LR * p.grad
    hf.save_pretrained(tmp_path / "stepped")  # the on-disk key names (transformers may fuse experts in memory)
    want = model_from_hf(desc.family, desc.args, _tensors(tmp_path / "stepped").__getitem__)
    after = {**first["after"], **last["after"]}
    assert set(after) == set(want)
    diff = {k: float((after[k] - want[k]).abs().max()) for k in want}
    worst = max(diff, key=diff.get)
    assert diff[worst] < ATOL, (worst, diff[worst])
    start = model_from_hf(desc.family, desc.args, _tensors(hf_dir(name)).__getitem__)
    assert min(float((after[k] - start[k]).abs().max()) for k in after if k.startswith("1.")) > 0  # block 0 stepped
    if desc.dims.tied:  # the owner (stage 0) and its twin (stage 1) hold the same stepped weight
        owner, twin = [i for i, d in enumerate(flat_layers(desc.family, desc.args)) if d.tie]
        shared = [k.split(".", 1)[1] for k in first["after"] if k.startswith(f"{owner}.")]
        assert shared and all(torch.equal(first["after"][f"{owner}.{k}"], last["after"][f"{twin}.{k}"]) for k in shared)


# ------------------------------------------------------------------ conversion
@pytest.mark.parametrize("name", FAMILIES)
def test_hf_round_trip_is_bit_exact_and_export_loads(hf_dir, name, tmp_path):
    from engine.checkpoints.convert import hf_to_pp, pp_to_hg

    src = hf_dir(name)
    out = pp_to_hg(hf_to_pp(src, tmp_path / "pp"), tmp_path / "out", max_shard_bytes=64_000)  # several shards
    a, b = _tensors(src), _tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids, _, _ = batch(64, seed=5)  # ids below every tiny vocab
    exported, ref = load_reference(out), load_reference(src)
    assert type(exported).__name__ == type(ref).__name__  # remote code: one class per dir
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids, use_cache=False).logits, ref(input_ids=ids, use_cache=False).logits)
