"""Bloom: our layers vs transformers' BloomForCausalLM on a tiny random model (fp32), on one
process and on a 2-stage DeepSpeed pipeline (tied embedding/head across stages), packing, and
HF -> pipeline -> HF conversion."""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models import get_family
from models.blocks import AttnOptions, LayerOptions
from models.pipeline import SequentialModel, make_loss
from tests.dist import run_ranks
from tests.model_check import shifted_labels

FAMILY = "bloom"
ATOL = 1e-5


def hf_state(hf_dir) -> dict[str, torch.Tensor]:
    """The HF checkpoint in our layout ("<layer>.<param>"), read by HF key from disk."""
    fam = get_family(FAMILY)
    disk = load_file(hf_dir / "model.safetensors")
    args = fam.Args.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    return {f"{i}.{ours}": disk[theirs] for i, names in enumerate(fam.hf_keys(args)) for ours, theirs in names.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny BloomForCausalLM with every parameter random (biases, norms), saved with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.tiny import make_tiny_tokenizer

    cfg = get_family(FAMILY).tiny_hf_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("bloom_hf")
    model.save_pretrained(out)
    make_tiny_tokenizer(out, ["a tiny model that knows nothing yet"] * 4)
    return out


def load_hf(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def ours(hf_dir, opts=LayerOptions()):
    fam = get_family(FAMILY)
    args = fam.Args.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    model = SequentialModel(fam, args, opts).eval()
    model.load_state_dict(hf_state(hf_dir))
    return model, make_loss(fam, args)


def batch(seed=1, b=2, s=16):
    ids = torch.randint(0, 320, (b, s), generator=torch.Generator().manual_seed(seed))
    labels = shifted_labels(ids)
    return ids, labels, torch.tensor(1.0) / (labels != -100).sum()


def test_tiny_config_and_aliases():
    fam = get_family(FAMILY)
    args = fam.Args.from_hf_config(fam.tiny_hf_config())
    assert (args.num_layers, args.num_heads, args.hidden_size, args.tie_word_embeddings) == (4, 6, 48, True)
    # old hub configs say n_embed / num_attention_heads
    old = fam.Args.from_hf_config({"vocab_size": 8, "n_embed": 16, "n_layer": 2, "num_attention_heads": 4})
    assert (old.hidden_size, old.num_heads, old.num_layers) == (16, 4, 2)
    groups = fam.layers(args)
    assert len(groups) == args.num_layers + 2 and [len(g) for g in (groups[0], groups[-1])] == [2, 2]
    keys = fam.hf_keys(args)
    assert keys[-1] == keys[0] == {"word_embeddings.weight": "transformer.word_embeddings.weight"}
    assert not any("lm_head" in k for names in keys for k in names.values())  # bloom checkpoints have none


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_transformers(hf_dir, impl):
    ids, labels, scale = batch()
    model, loss_fn = ours(hf_dir, LayerOptions(attn=AttnOptions(impl=impl)))
    with torch.no_grad():
        ref = load_hf(hf_dir)(ids, labels=ids)
        logits = model(ids)
        loss = loss_fn(logits, (labels, scale))
    assert ref.logits.abs().max() > 1  # random enough that a wrong layout could not pass
    assert (logits - ref.logits).abs().max() < ATOL
    assert abs(float(loss) - float(ref.loss)) < ATOL


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex"])
def test_packed_row_equals_documents(hf_dir, impl):
    """Two documents packed in one row (positions restart) give each document's own logits:
    no attention across them, ALiBi distances within each."""
    ids, _, _ = batch(seed=2, b=1, s=16)
    cut = 7
    pos = torch.cat([torch.arange(cut), torch.arange(16 - cut)])[None]
    packed, _ = ours(hf_dir, LayerOptions(attn=AttnOptions(packed=True, impl=impl)))
    single, _ = ours(hf_dir, LayerOptions(attn=AttnOptions(impl=impl)))
    with torch.no_grad():
        row = packed(ids, pos)
        docs = torch.cat([single(ids[:, :cut]), single(ids[:, cut:])], dim=1)
        unmasked = single(ids, pos)  # same positions but attending across the boundary
    assert (row - docs).abs().max() < ATOL
    assert (unmasked[:, cut:] - docs[:, cut:]).abs().max() > 1e-3


def pipeline_eval_and_step(family_name, hf_config, state, parts, eval_batch, micro_batches, lr):
    """One rank of a pipeline: eval `eval_batch`, then train one step (SGD) over `micro_batches`.

    Returns a dict: the last stage's eval `loss` and `outputs` (None elsewhere), the step's
    `step_loss`, the loss hook's `metrics` after eval and after the step (if it has
    pop_metrics), and every local layer's weights `after` the step ("<layer>.<param>")."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from engine.distributed import init_distributed
    from models.pipeline import build_pipeline

    init_distributed()
    fam = get_family(family_name)
    args = fam.Args.from_hf_config(hf_config)
    module = build_pipeline(fam, args, LayerOptions(), PipeDataParallelTopology(num_pp=len(parts), num_dp=1), parts,
                            seed=1)

    def local_layers():
        for idx, f in enumerate(module.forward_funcs):  # a tied twin is partial(forward_fn, tied module)
            layer = f.args[0] if isinstance(f, partial) else f
            if isinstance(layer, torch.nn.Module):
                yield f"{idx + module._local_start}.", layer

    for prefix, layer in local_layers():
        layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=lr),
                                      config={"train_micro_batch_size_per_gpu": eval_batch[0][0].shape[0],
                                              "gradient_accumulation_steps": len(micro_batches)})
    pop = getattr(module.loss_fn, "pop_metrics", dict)
    loss, outputs = engine.eval_batch(iter([eval_batch]), return_logits=True, num_micro_batches=1)
    metrics = [pop()]
    step_loss = engine.train_batch(iter(micro_batches))
    metrics.append(pop())
    after = {prefix + k: v.detach().clone() for prefix, layer in local_layers() for k, v in layer.state_dict().items()}
    if outputs is not None:
        outputs = tuple(t.detach() for t in outputs) if isinstance(outputs, tuple) else outputs.detach()
    return dict(loss=float(loss), outputs=outputs, step_loss=float(step_loss), metrics=metrics, after=after)


def test_pipeline_matches_transformers_and_trains_tied(hf_dir):
    """pp=2 with the embedding alone on stage 0 and the tied head on stage 1: eval logits/loss
    equal transformers', and one SGD step over 2 micro-batches equals transformers' step on the
    same objective (the tied weight's gradient summed over both uses), with both copies equal."""
    hf_config = json.loads((hf_dir / "config.json").read_text())
    state = hf_state(hf_dir)
    mbs, n = [], 0
    for seed in (3, 4):
        ids, labels, _ = batch(seed=seed)
        mbs.append(((ids, torch.arange(16).expand_as(ids)), labels))
        n += int((labels != -100).sum())
    gas, lr = len(mbs), 1.0
    scale = torch.tensor(gas / n)  # gas * dp / answer tokens of the global batch
    micro_batches = [(inp, (labels, scale)) for inp, labels in mbs]
    (ids0, pos0), labels0 = mbs[0]
    eval_batch = ((ids0, pos0), (labels0, torch.tensor(1.0) / (labels0 != -100).sum()))

    ranks = run_ranks(pipeline_eval_and_step, 2, FAMILY, hf_config, state, [1, 5], eval_batch, micro_batches, lr)
    loss, logits, step_loss = ranks[-1]["loss"], ranks[-1]["outputs"], ranks[-1]["step_loss"]

    hf = load_hf(hf_dir)
    with torch.no_grad():
        ref = hf(ids0, labels=ids0)
    assert (logits - ref.logits).abs().max() < ATOL
    assert abs(loss - float(ref.loss)) < ATOL

    # transformers' step on the same objective: sum of token losses / answer tokens
    hf.train()
    objective = sum(F.cross_entropy(hf(inp[0]).logits.flatten(0, 1), labels.flatten(), reduction="sum")
                    for inp, labels in mbs) / n
    objective.backward()
    assert abs(step_loss - objective.item()) < ATOL
    with torch.no_grad():
        for p in hf.parameters():
            p -= lr * p.grad
    stepped = {k: v for k, v in hf.state_dict().items()}
    fam = get_family(FAMILY)
    args = fam.Args.from_hf_config(hf_config)
    after = {**ranks[0]["after"], **ranks[1]["after"]}
    last = len(fam.hf_keys(args)) - 1
    assert set(after) == set(state)
    diff = {f"{i}.{ours_name}": float((after[f"{i}.{ours_name}"] - stepped[theirs]).abs().max())
            for i, names in enumerate(fam.hf_keys(args)) for ours_name, theirs in names.items()}
    worst = max(diff, key=diff.get)
    assert diff[worst] < ATOL, (worst, diff[worst])
    assert max(float((after[k] - state[k]).abs().max()) for k in state) > 1e-3
    tied = "word_embeddings.weight"
    assert torch.equal(ranks[0]["after"][f"0.{tied}"], ranks[1]["after"][f"{last}.{tied}"])


def test_convert_round_trip(hf_dir, tmp_path):
    """HF -> pipeline -> HF is bit-exact, writes the tied weight once, and loads with transformers."""
    from engine.checkpoints.convert import hf_to_pp, pp_to_hg

    pp = hf_to_pp(hf_dir, tmp_path / "pp")
    out = pp_to_hg(pp, tmp_path / "hf_out")
    original = load_file(hf_dir / "model.safetensors")
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(f))
    assert set(written) == set(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    ids, _, _ = batch(seed=5)
    with torch.no_grad():
        assert torch.equal(load_hf(out)(ids).logits, load_hf(hf_dir)(ids).logits)
