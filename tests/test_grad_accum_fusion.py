"""fp32 gradient accumulation fused into the weight-gradient GEMM (models/fused_linear.py,
engine/training/grad_accum.py): exact fp32 sums, input gradients unchanged, torch.compile without
graph breaks or buffer copies, and a 2-rank pipeline run that trains, resumes and reshapes like
the unfused one."""
import copy
import json
import shutil

import pytest
import torch
from torch import nn

from models.fused_linear import WgradFusedLinear, fuse_wgrad, fused_weights
from tests.dist import run_ranks
from tests.test_train import config

BF16 = torch.bfloat16


def micro_batches(n=3, tokens=(2, 5), d_in=32, d_out=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*tokens, d_in, generator=g).to(BF16), torch.randn(*tokens, d_out, generator=g).to(BF16))
            for _ in range(n)]


def fused_copy(linear: nn.Linear) -> WgradFusedLinear:
    m = copy.deepcopy(linear)
    fuse_wgrad(m)
    m.weight.main_grad = torch.zeros(m.weight.shape, dtype=torch.float32)
    return m


def test_linear_accumulates_exact_fp32_sum_and_keeps_input_grads():
    torch.manual_seed(0)
    ref = nn.Linear(32, 48, bias=True).to(BF16)
    fused = fused_copy(ref)
    assert isinstance(fused, WgradFusedLinear)
    unfused = torch.zeros(48, 32)  # DeepSpeed's path: bf16 gradient per micro-batch, added into fp32
    batches = micro_batches()
    for x, g in batches:
        x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref.weight.grad = ref.bias.grad = None
        ref(x_ref).backward(g)
        fused.bias.grad = None
        fused(x_fused).backward(g)
        unfused += ref.weight.grad.float()
        assert torch.equal(x_fused.grad, x_ref.grad)
        torch.testing.assert_close(fused.bias.grad, ref.bias.grad, rtol=0, atol=0)
    assert fused.weight.grad is None  # the gradient lives in main_grad only
    exact = sum(g.double().flatten(0, 1).t() @ x.double().flatten(0, 1) for x, g in batches)
    err_fused = (fused.weight.main_grad.double() - exact).abs().max().item()
    err_unfused = (unfused.double() - exact).abs().max().item()
    assert err_fused < 1e-5 * exact.abs().max().item()  # fp32 rounding only
    assert err_fused * 100 < err_unfused  # bf16 rounding of each micro-batch's gradient is gone


def test_linear_without_main_grad_is_plain():
    torch.manual_seed(0)
    ref = nn.Linear(8, 4).to(BF16)
    m = copy.deepcopy(ref)
    fuse_wgrad(m)
    x = torch.randn(3, 8, dtype=BF16)
    ref(x).sum().backward()
    m(x).sum().backward()
    assert torch.equal(m.weight.grad, ref.weight.grad) and m.state_dict().keys() == ref.state_dict().keys()


def attach_flat_main_grads(weights, pad=16) -> torch.Tensor:
    """main_grad of each weight as a view into one flat fp32 buffer, at an offset, as DeepSpeed's
    BF16_Optimizer lays them out (views of one storage: compile must not copy the whole buffer)."""
    flat = torch.zeros(pad + sum(w.numel() for w in weights))
    offset = pad
    for w in weights:
        w.main_grad = flat[offset:offset + w.numel()].view(w.shape)
        offset += w.numel()
    return flat


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler"))])
def test_compiled_equals_eager_under_a_pipeline_schedule(backend):
    """Two fused linears whose main_grads share one buffer; all forwards before the backwards and
    the buffer zeroed in between (1F1B interleaves them, DeepSpeed zeroes after each step): compiled
    (one graph, fullgraph) gives eager's numbers. Inductor calls the op on each view itself: no
    copy of main_grad (or its buffer) in its generated code."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48, bias=True), nn.Linear(48, 48, bias=False)).to(BF16)
    batches = micro_batches()
    results = {}
    for mode in ("eager", backend):
        m = copy.deepcopy(base)
        flat = attach_flat_main_grads(fuse_wgrad(m))
        flat.fill_(7.0)
        run = m if mode == "eager" else torch.compile(m, backend=backend, fullgraph=True)
        xs = [x.clone().requires_grad_() for x, _ in batches]
        outs = [run(x) for x in xs]
        flat.zero_()

        def backward():
            for y, (_, g) in zip(outs, batches):
                y.backward(g)

        if mode == "inductor":
            _, code = run_and_get_code(backward)
            bwd = "\n".join(code)
            assert bwd.count("ppllm.wgrad_accumulate.default(primals_") == 2  # on the input views themselves
            assert "clone" not in bwd and "copy_" not in bwd
        else:
            backward()
        results[mode] = (flat.clone(), [x.grad for x in xs], m[0].bias.grad)
    (mg_e, xg_e, bg_e), (mg_c, xg_c, bg_c) = results["eager"], results[backend]
    assert not mg_e[:16].any() and mg_e[16:].all()
    tol = dict(rtol=0, atol=0) if backend == "aot_eager" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mg_c, mg_e, **tol)
    torch.testing.assert_close(bg_c, bg_e, **tol)
    for a, b in zip(xg_c, xg_e):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("ckpt", ["none", "full", "selective"])
def test_block_main_grads_equal_plain_weight_grads(ckpt):
    """A whole llama block with biases (fp32 here, so both sides are fp32 sums), under each
    activation-checkpointing mode, eager and compiled (aot_eager, no graph breaks)."""
    from models import llama
    from models.block_base import LayerOptions
    from models.pipeline import wgrad_fused_blocks

    args = llama.Args.from_hf_config(llama.tiny_hf_config(attention_bias=True, mlp_bias=True))
    torch.manual_seed(0)
    plain = llama.Block(args, LayerOptions(grad_ckpt=ckpt)).train()
    x = torch.randn(2, 16, args.hidden_size)
    pos = torch.arange(16).expand(2, 16)
    g = torch.randn_like(x)
    plain((x, pos))[0].backward(g)
    for compiled in (False, True):
        fused = copy.deepcopy(plain)
        fused.zero_grad(set_to_none=True)
        weights = wgrad_fused_blocks([fused])
        assert len(weights) == 4  # qkv, o, gate_up, down
        attach_flat_main_grads(weights)
        if compiled:
            fused.block = torch.compile(fused.block, backend="aot_eager", fullgraph=True)
        x_f = x.clone().requires_grad_()
        fused((x_f, pos))[0].backward(g)
        for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
            got = q.main_grad if any(q is w for w in weights) else q.grad
            assert (q.grad is None) == any(q is w for w in weights), name
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_switch(monkeypatch, tiny_pp, tmp_path):
    from engine.config import ConfigError, from_dict
    from engine.training.grad_accum import OLD_ENV, wgrad_fusion

    monkeypatch.delenv(OLD_ENV, raising=False)

    def on(**over):
        return wgrad_fusion(from_dict(config(tiny_pp, tmp_path, **over)))

    bf16 = {"bf16": {"enabled": True}}
    assert on(**bf16)  # default: on (measured on an H200: +4.1% tok/s)
    assert not on(wgrad_fusion=False, **bf16)
    assert not on()  # fp32 run: nothing to fuse into
    assert not on(data_types={"grad_accum_dtype": "bf16"}, **bf16)  # bf16 accumulation: no fp32 buffer
    with pytest.raises(ConfigError, match="'wgrad_fusion' must be bool"):
        on(wgrad_fusion="yes", **bf16)
    monkeypatch.setenv(OLD_ENV, "0")  # the old opt-in switch: refused, not silently ignored
    with pytest.raises(ConfigError, match=f"{OLD_ENV}='0' is no longer read.*wgrad_fusion"):
        on(**bf16)


# ----------------------------------------------------------------------------- 2 gloo ranks
def _train_fused(raw):
    """Train; also whether every block linear was linked and still aliases the optimizer's fp32
    gradient view after training."""
    from engine.config import from_dict
    from engine.training import grad_accum
    from engine.training.loop import train

    engines = []
    link = grad_accum.link

    def spy(engine):
        engines.append(engine)
        return link(engine)

    grad_accum.link = spy
    losses = train(from_dict(raw)).losses
    views = []
    for engine in engines:
        opt = engine.optimizer
        where = {id(p): (i, j) for i, grp in enumerate(opt.bf16_groups) for j, p in enumerate(grp)}
        for w in fused_weights(engine.module):  # block linears and mixtral's stacked experts
            i, j = where[id(w)]
            views.append(w.main_grad.data_ptr() == opt.fp32_groups_gradients[i][j].data_ptr()
                         and opt.fp32_groups_has_gradients[i][j] and w.grad is None)
    return losses, views


def run_fused(raw, fusion=True):
    out = run_ranks(_train_fused, 2, {**raw, "wgrad_fusion": fusion})
    (losses, views), (losses1, views1) = out[0], out[1]
    assert losses == losses1
    return losses, views + views1


def grad_norms(run_dir):
    return {m["step"]: m["grad_norm"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_pipeline_run_fused_vs_unfused_resume_and_reshape(tiny_pp, tmp_path):
    """pp=2, bf16: fusion on vs off on the same data (bf16-level agreement, norms too); with it on,
    stop + resume is bitwise the uninterrupted run, and a dp=2 continuation of its checkpoint
    follows the pp=2 one."""
    bf16 = {"bf16": {"enabled": True}}
    off, views = run_fused(config(tiny_pp, tmp_path / "off", steps=4, **bf16), False)
    assert views == []
    full, views = run_fused(config(tiny_pp, tmp_path / "full", steps=4, **bf16))
    assert len(views) == 2 * 2 * 4 and all(views)  # 2 ranks x 2 blocks x 4 linears; aliasing survived
    assert full[1] == off[1]  # same weights, same forward
    for s in (2, 3, 4):
        assert full[s] == pytest.approx(off[s], rel=1e-4), (s, full, off)
    norm_on, norm_off = grad_norms(tmp_path / "full"), grad_norms(tmp_path / "off")
    for s in norm_on:
        assert norm_on[s] == pytest.approx(norm_off[s], rel=1e-3), (s, norm_on, norm_off)

    first, _ = run_fused(config(tiny_pp, tmp_path / "split", steps=2, **bf16))
    shutil.copytree(tmp_path / "split", tmp_path / "dp2")
    second, _ = run_fused(config(tiny_pp, tmp_path / "split", steps=4, **bf16))
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4]
    assert {**first, **second} == full  # bitwise

    dp2, views = run_fused(config(tiny_pp, tmp_path / "dp2", steps=4, dims=(1, 2), parts=(6,),
                                  gradient_accumulation_steps=1, **bf16))
    assert sorted(dp2) == [3, 4] and len(views) == 2 * 4 * 4 and all(views)
    for s in (3, 4):
        assert dp2[s] == pytest.approx(full[s], rel=1e-4), (s, dp2, full)


def test_mixtral_pipeline_fuses_the_experts(tmp_path):
    """pp=2 bf16 mixtral: the stacked experts are linked too (their main_grad aliases the optimizer's
    fp32 view, no `.grad` after training) and the run follows the unfused one (bf16-level)."""
    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model, sample_texts
    from tests.conftest import EXAMPLE_DATA

    make_tiny_hf_model(tmp_path / "hf", "mixtral", sample_texts(EXAMPLE_DATA))
    hf_to_pp(tmp_path / "hf", tmp_path / "pp")
    bf16 = {"bf16": {"enabled": True}}
    off, views = run_fused(config(tmp_path / "pp", tmp_path / "off", steps=2, **bf16), False)
    assert views == []
    on, views = run_fused(config(tmp_path / "pp", tmp_path / "on", steps=2, **bf16))
    assert len(views) == 2 * 2 * 5 and all(views)  # 2 ranks x 2 blocks x (router, qkv, o, 2 stacked experts)
    assert on[1] == off[1]
    assert on[2] == pytest.approx(off[2], rel=1e-3), (on, off)  # after one update from fused vs hook-added grads
    norm_on, norm_off = grad_norms(tmp_path / "on"), grad_norms(tmp_path / "off")
    assert norm_on[1] == pytest.approx(norm_off[1], rel=1e-2)  # the experts' gradients are in the clipped norm
