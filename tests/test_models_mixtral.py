"""Mixtral quirks vs transformers' MixtralForCausalLM (fp32): the router aux loss and its metrics,
sliding window (+ packing), unrouted experts, the embedding stage's router statistics, grad
checkpointing. The checks every family gets (pp=2 step with the router loss across stages,
packing, conversion with on-disk per-expert keys) are in tests/test_families.py."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from models import get_family, mixtral
from models.attention import AttnOptions
from models.block_base import LayerOptions
from engine.model import expected_shapes
from models.keymap import model_from_hf
from models.pipeline import SequentialModel, make_loss
from tests.model_check import shifted_labels

FAMILY = "mixtral"
ATOL = 1e-5
COEF = 0.5  # large, so a wrongly normalised aux term shows in the gradients


def make_hf(out_dir, tokenizer=True, **overrides):
    """A tiny MixtralForCausalLM with random weights, saved (on-disk keys) with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.tiny import make_tiny_tokenizer

    cfg = get_family(FAMILY).tiny_hf_config(router_aux_loss_coef=COEF, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out_dir)
    if tokenizer:
        make_tiny_tokenizer(out_dir, ["a tiny model that knows nothing yet"] * 4)
    return out_dir


def hf_state(hf_dir) -> dict[str, torch.Tensor]:
    """The HF checkpoint in our layout ("<layer>.<param>"), read by HF key from disk."""
    fam = get_family(FAMILY)
    disk = load_file(hf_dir / "model.safetensors")
    return model_from_hf(fam, args_of(hf_dir), disk.__getitem__)


def args_of(hf_dir):
    return get_family(FAMILY).Args.from_hf_config(json.loads((hf_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("mixtral_hf"))


def load_hf(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def ours(hf_dir, opts=LayerOptions()):
    model = SequentialModel(get_family(FAMILY), args_of(hf_dir), opts).eval()
    model.load_state_dict(hf_state(hf_dir))
    return model


def batch(seed=1, b=2, s=16):
    ids = torch.randint(3, 320, (b, s), generator=torch.Generator().manual_seed(seed))
    labels = shifted_labels(ids)
    return ids, labels, torch.tensor(1.0) / (labels != -100).sum()


def test_tiny_config_and_keys():
    fam = get_family(FAMILY)
    args = fam.Args.from_hf_config(fam.tiny_hf_config())
    assert (args.num_experts, args.top_k, args.num_layers, args.sliding_window) == (4, 2, 4, None)
    keys = fam.hf_keys(args)
    assert len(keys) == args.num_layers + 2
    down = keys[3]["block_sparse_moe.experts.down_proj"]  # stacked [E, h, ffn] from the on-disk per-expert w2
    assert down.keys[3] == "model.layers.2.block_sparse_moe.experts.3.w2.weight" and down.stack == 4
    up = keys[3]["block_sparse_moe.experts.gate_up_proj"]  # [E, 2*ffn, h]: w1, w3 per expert
    assert up.keys[:3] == tuple(f"model.layers.2.block_sparse_moe.experts.{e}.{w}.weight"
                                for e, w in ((0, "w1"), (0, "w3"), (1, "w1")))
    shapes = expected_shapes(fam, args)[3]
    assert shapes["block_sparse_moe.experts.gate_up_proj"] == (4, 2 * 96, 64)
    assert shapes["block_sparse_moe.experts.down_proj"] == (4, 64, 96)
    assert fam.make_loss(dataclasses.replace(args, router_aux_loss_coef=0.25)).coef == 0.25  # overridable


def test_matches_transformers_with_aux_loss(hf_dir):
    """Logits, LM + coef * aux loss, and the aux loss reported by pop_metrics equal transformers'."""
    ids, labels, scale = batch()
    model, loss_fn = ours(hf_dir), make_loss(get_family(FAMILY), args_of(hf_dir))
    with torch.no_grad():
        ref = load_hf(hf_dir)(ids, labels=ids, output_router_logits=True)
        logits, aux, z = model(ids)
        loss = loss_fn((logits, aux, z), (labels, scale))
    assert ref.logits.abs().max() > 1
    assert (logits - ref.logits).abs().max() < ATOL
    assert abs(float(aux) - float(ref.aux_loss)) < ATOL
    assert abs(float(loss) - float(ref.loss)) < ATOL  # transformers adds router_aux_loss_coef * aux too
    metrics = loss_fn.pop_metrics()
    assert abs(metrics["aux_loss"] - float(ref.aux_loss)) < ATOL
    assert abs(metrics["lm_loss"] + COEF * metrics["aux_loss"] - float(ref.loss)) < ATOL
    assert loss_fn.pop_metrics() == {"lm_loss": 0.0, "aux_loss": 0.0}  # popped


def test_sliding_window_and_packing(tmp_path):
    """With a sliding window: logits equal transformers' (sdpa and eager), and a packed row
    equals its documents run alone."""
    window = 5
    hf_dir = make_hf(tmp_path, tokenizer=False, sliding_window=window)
    ids, _, _ = batch(seed=2, b=1, s=16)
    with torch.no_grad():
        ref = load_hf(hf_dir)(ids).logits
        for impl in ("sdpa", "eager"):
            logits = ours(hf_dir, LayerOptions(attn=AttnOptions(impl=impl)))(ids)[0]
            assert (logits - ref).abs().max() < ATOL
        cut = 9
        pos = torch.cat([torch.arange(cut), torch.arange(16 - cut)])[None]
        row = ours(hf_dir, LayerOptions(attn=AttnOptions(packed=True)))(ids, pos)[0]
        single = ours(hf_dir)
        docs = torch.cat([single(ids[:, :cut])[0], single(ids[:, cut:])[0]], dim=1)
        unmasked = single(ids, pos)[0]
    assert (row - docs).abs().max() < ATOL
    assert (unmasked[:, cut:] - docs[:, cut:]).abs().max() > 1e-3
    full = dataclasses.replace(args_of(hf_dir), sliding_window=None)
    plain = SequentialModel(get_family(FAMILY), full).eval()
    plain.load_state_dict(hf_state(hf_dir))
    with torch.no_grad():
        assert (plain(ids)[0] - ref).abs().max() > 1e-3  # the window matters at this length


@pytest.mark.parametrize("path", ["grouped", "loop"])
def test_unrouted_experts_still_run(hf_dir, path, monkeypatch):
    """The experts module runs in every layer even when some expert is picked by no token
    (ZeRO-3 gathers its parameters in that forward, collectively); an unpicked expert's slice
    of the stacked gradients is zero, a picked one's is not."""
    if path == "loop":
        monkeypatch.setattr(mixtral, "grouped_mm", lambda x, w: False)
    model = ours(hf_dir).train()
    calls = []
    for i, layer in model.named_children():
        moe = getattr(layer, "block_sparse_moe", None)
        if moe is None:
            continue
        with torch.no_grad():  # route every token to experts 0 and 1
            moe.gate.weight.zero_()
        moe.gate.register_forward_hook(lambda m, a, out: out + torch.tensor([2.0, 1.0, 0.0, 0.0]))
        moe.experts.register_forward_hook(lambda m, a, out, i=i: calls.append(i))
    ids, labels, scale = batch()
    assert mixtral.grouped_mm(torch.zeros(1, 64), torch.zeros(4, 192, 64)) == (path == "grouped")
    make_loss(get_family(FAMILY), args_of(hf_dir))(model(ids), (labels, scale)).backward()
    assert len(calls) == args_of(hf_dir).num_layers
    for layer in model.children():
        moe = getattr(layer, "block_sparse_moe", None)
        if moe is None:
            continue
        for w in (moe.experts.gate_up_proj, moe.experts.down_proj):
            assert w.grad is not None and w.grad.shape == w.shape
            assert [bool(w.grad[e].abs().max() > 0) for e in range(4)] == [True, True, False, False]


def test_grouped_matches_loop():
    """The grouped-GEMM path equals the per-expert loop: outputs, input and weight gradients, stats;
    fp32 exactly (to rounding), bf16 within bf16 rounding; token counts that need padding included."""
    args = mixtral.Args.from_hf_config(mixtral.tiny_hf_config())
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for tokens in (37, 64):
            moe = mixtral.SparseMoE(args).to(dtype)
            x = torch.randn(tokens, args.hidden_size, dtype=dtype)
            g = torch.randn(tokens, args.hidden_size, dtype=dtype)
            results = []
            for path in ("grouped", "loop"):
                moe.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_()
                if path == "loop":
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr(mixtral, "grouped_mm", lambda x, w: False)
                        out, stats, z = moe(xi)
                else:
                    assert mixtral.grouped_mm(x, moe.experts.gate_up_proj)
                    out, stats, z = moe(xi)
                (out.float() * g.float()).sum().backward()
                results.append((out.float(), xi.grad.float(), [p.grad.float() for p in moe.parameters()], stats, z))
            (o1, gx1, gw1, s1, z1), (o2, gx2, gw2, s2, z2) = results
            assert torch.equal(s1, s2) and torch.equal(z1, z2)
            assert (o1 - o2).abs().max() <= tol * o2.abs().max()
            assert (gx1 - gx2).abs().max() <= tol * gx2.abs().max()
            assert all((a - b).abs().max() <= tol * b.abs().max().clamp(min=1e-6) for a, b in zip(gw1, gw2))


def test_embedding_stage_output_joins_backward():
    """A stage holding only the embedding still outputs router statistics that backward accepts."""
    fam = get_family(FAMILY)
    args = fam.Args.from_hf_config(fam.tiny_hf_config())
    ids = torch.zeros(1, 4, dtype=torch.long)
    _, _, stats, z, real = fam.Embed(args, LayerOptions())((ids, torch.arange(4)[None]))
    assert stats.shape == (2, args.num_experts) and stats.requires_grad
    assert z.shape == (1,) and z.requires_grad and real.dtype == torch.int32  # DeepSpeed sends no bool over NCCL


def test_grad_ckpt_same_gradients(hf_dir):
    """Recomputing blocks in backward (router statistics included) gives the same gradients."""
    ids, labels, scale = batch()
    grads = []
    for ckpt in (False, True):
        model = ours(hf_dir, LayerOptions(grad_ckpt=ckpt)).train()
        make_loss(get_family(FAMILY), args_of(hf_dir))(model(ids), (labels, scale)).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert all(grads[1][k] is not None and torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
    assert grads[1]["1.block_sparse_moe.gate.weight"].abs().max() > 0


# ------------------------------------------------------------------ ST-MoE router z-loss (router_z_loss_coef)
Z_COEF = 0.5  # large, so a wrongly normalised z term shows in the gradients
PAD = 2  # = eos, as data.tokenize.SpecialIds picks when the tokenizer has no pad token


def padded_rows():
    """Rows as data.packing.layout_row lays them out: a 10-token document ending in eos (= pad)
    then 6 pads (positions restart at 0), and a row packed with two documents and no padding."""
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[0, 9:] = PAD
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(6)]), torch.cat([torch.arange(7), torch.arange(9)])])
    real = torch.ones(2, 16, dtype=torch.bool)
    real[0, 10:] = False
    labels = shifted_labels(ids)
    labels[~real] = -100
    return ids, pos, real, (labels, torch.tensor(1.0) / (labels != -100).sum())


def reference_z(router_logits, real):
    """ST-MoE's router z-loss written out: per MoE layer, the mean over real tokens of
    logsumexp(router logits)^2; averaged over the layers."""
    per_layer = [lg.float().logsumexp(dim=-1).pow(2)[real.flatten()].mean() for lg in router_logits]
    return sum(per_layer) / len(per_layer)


def test_router_z_loss_value_and_gradients_match_reference(hf_dir):
    """The z term equals ST-MoE's formula on transformers' router logits (padding left out), it
    is added with its coefficient and popped as router_z_loss, and its gradients equal those of
    the formula applied to the router logits (captured by hooks) of the same model."""
    from models.loss import causal_lm_loss
    from models.mixtral import real_tokens

    fam, (ids, pos, real, target) = get_family(FAMILY), padded_rows()
    assert torch.equal(real_tokens(ids, pos), real.int())  # the padding found from ids + positions alone
    full = torch.full((1, 8), PAD)  # an empty eval row (engine.training.evaluate): padding only
    assert not real_tokens(full, torch.arange(8)[None]).any()
    args = dataclasses.replace(args_of(hf_dir), router_z_loss_coef=Z_COEF)
    with torch.no_grad():
        ref_logits = load_hf(hf_dir)(ids, position_ids=pos, output_router_logits=True).router_logits
    want = reference_z(ref_logits, real)
    assert abs(float(want) - float(reference_z(ref_logits, torch.ones_like(real)))) > 1e-3  # the padding matters

    grads = {}
    for way in ("ours", "reference", "no_z"):
        model, captured = ours(hf_dir).train(), []
        for layer in model.children():
            if hasattr(layer, "block_sparse_moe"):
                layer.block_sparse_moe.gate.register_forward_hook(lambda m, a, out: captured.append(out))
        logits, aux, z = model(ids, pos)
        if way == "ours":
            loss_fn = make_loss(fam, args)
            loss = loss_fn((logits, aux, z), target)
            assert abs(z.item() - float(want)) < ATOL
            assert abs(loss.item() - (causal_lm_loss(logits, target) + COEF * aux + Z_COEF * want).item()) < ATOL
            metrics = loss_fn.pop_metrics()
            assert abs(metrics["router_z_loss"] - float(want)) < ATOL and metrics["aux_loss"] > 0
        else:
            loss = causal_lm_loss(logits, target) + COEF * aux
            if way == "reference":
                loss = loss + Z_COEF * reference_z(captured, real)
        loss.backward()
        grads[way] = {k: p.grad for k, p in model.named_parameters()}
    for k, g in grads["ours"].items():
        torch.testing.assert_close(g, grads["reference"][k], atol=1e-6, rtol=1e-5)
    gate = "1.block_sparse_moe.gate.weight"
    assert (grads["ours"][gate] - grads["no_z"][gate]).abs().max() > 1e-3  # the z term moves the router


def test_router_z_loss_coef_is_for_moe_families_only(tmp_path):
    """A training config's router_z_loss_coef reaches mixtral's Args; on a dense family it is one line."""
    from engine.config import ConfigError, from_dict
    from engine.model import Model

    def cfg(name, coef):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(json.dumps(get_family(name).tiny_hf_config()))
        return from_dict({"model_path": str(tmp_path / name), "data_path": "d", "save_path": "s",
                          "router_z_loss_coef": coef}, "x.yml")

    assert Model.for_training(cfg(FAMILY, 0.01)).args.router_z_loss_coef == 0.01
    assert Model.for_training(cfg(FAMILY, 0)).args.router_z_loss_coef == 0.0
    assert Model.for_training(cfg("llama", 0)).name == "llama"  # 0 = off: fine anywhere
    with pytest.raises(ConfigError) as e:
        Model.for_training(cfg("llama", 1e-3))
    assert str(e.value).startswith("x.yml: router_z_loss_coef applies to MoE families only") and "\n" not in str(e.value)
