"""Mixtral's experts in the fp32 wgrad fusion (models/grouped_wgrad.py): the Triton kernel in Triton's
interpreter against an fp64 reference (empty groups, sizes off the block grid), and the fused MoE
layer / block against the unfused one (fp32: equal; bf16: closer to the exact sum), eager and
compiled. The 2-rank pipeline run with the experts linked is in tests/test_grad_accum_fusion.py."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import mixtral
from models.fused_linear import fuse_wgrad, fused_weights
from models.grouped_wgrad import torch_grouped_wgrad

ROOT = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16
# expert row counts: empty first, middle and last groups, groups shorter and longer than a block
COUNTS = [0, 19, 0, 40, 3, 0]


def reference(acc, dy, x, counts):
    out, start = acc.double().clone(), 0
    for e, c in enumerate(counts):
        out[e] += dy[start:start + c].double().t() @ x[start:start + c].double()
        start += c
    return out


def case(dtype, m, n, counts=COUNTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    dy, x = torch.randn(t, m, generator=g).to(dtype), torch.randn(t, n, generator=g).to(dtype)
    acc = torch.randn(len(counts), m, n, generator=g)  # accumulates onto what is there
    return acc, dy, x, torch.tensor(counts).cumsum(0).to(torch.int32)


def check_kernel(run) -> None:
    """`run(acc, dy, x, ends, **kw)` adds in place: equal to fp64 within fp32 rounding, the empty
    experts' slices bit-for-bit unchanged. (Run by the interpreter subprocess and in-process.)"""
    for dtype in (torch.float32, BF16):
        for m, n in ((40, 24), (24, 40)):  # both tile orders (N_FASTEST); 16-blocks leave partial tiles
            acc, dy, x, ends = case(dtype, m, n)
            before, ptr = acc.clone(), acc.data_ptr()
            exact = reference(acc, dy, x, COUNTS)
            run(acc, dy, x, ends)
            assert acc.data_ptr() == ptr
            err = ((acc.double() - exact).abs().max() / exact.abs().max()).item()
            assert err < 1e-6, (dtype, m, n, err)
            for e, c in enumerate(COUNTS):
                if c == 0:
                    assert torch.equal(acc[e], before[e]), (dtype, e)


INTERPRETED = """
import sys; sys.path.insert(0, {root!r})
from models import grouped_wgrad
from tests.test_grouped_wgrad import check_kernel
check_kernel(lambda *a: grouped_wgrad.triton_grouped_wgrad(*a, config=(16, 16, 16, 1, 1)))
print("KERNEL OK")
"""


def test_triton_kernel_in_the_interpreter():
    """The Triton kernel itself (TRITON_INTERPRET=1 must be set before Triton decorates it: a fresh
    process), 16 x 16 x 16 blocks so that every group size and both dims leave partial blocks."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED.format(root=str(ROOT))], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "KERNEL OK" in proc.stdout, proc.stderr[-3000:]


def test_torch_fallback():
    check_kernel(torch_grouped_wgrad)


def moe_pair(dtype, seed=0):
    args = mixtral.Args.from_hf_config(mixtral.tiny_hf_config(num_local_experts=6))
    torch.manual_seed(seed)
    plain = mixtral.SparseMoE(args).to(dtype)
    fused = copy.deepcopy(plain)
    weights = fuse_wgrad(fused)
    assert [w.dim() for w in weights] == [2, 3, 3] and weights == fused_weights(fused)  # router, gate_up, down
    for w in weights:
        w.main_grad = torch.full(w.shape, 0.5)  # accumulates onto what is there
    # the last expert is never picked: an empty group
    for m in (plain, fused):
        m.gate.register_forward_hook(lambda mod, a, out: out - 1e4 * (torch.arange(6) == 5))
    return plain, fused, weights


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_moe_layer_fused_equals_unfused(dtype, monkeypatch):
    """Three micro-batches (one of a token count off any alignment): input gradients bitwise the
    unfused ones; the experts' main_grad = 0.5 + the sum of the unfused gradients (fp32: to fp32
    rounding; bf16: within bf16 rounding, and closer to the exact fp64 sum of the GEMM's products
    than bf16 gradients added in fp32 are), nothing in `.grad`, the unpicked expert's slices untouched."""
    from models import grouped_wgrad

    plain, fused, weights = moe_pair(dtype)
    calls = []  # what the fused backward accumulated: (main_grad, grad_out, x, ends)
    accumulate = grouped_wgrad.grouped_wgrad_accumulate
    monkeypatch.setattr(grouped_wgrad, "grouped_wgrad_accumulate",
                        lambda *a: (calls.append([t.clone() for t in a[1:]] + [a[0]]), accumulate(*a))[1])
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(t, 64, generator=g).to(dtype) for t in (37, 64, 5)]
    unfused = [torch.full(w.shape, 0.5) for w in weights]
    for x in batches:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        plain.zero_grad(set_to_none=True)
        for m, inp in ((plain, a), (fused, b)):
            out = m(inp)[0]
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert torch.equal(a.grad, b.grad)
        for i, p in enumerate((plain.gate.weight, plain.experts.gate_up_proj, plain.experts.down_proj)):
            unfused[i] += p.grad.float()
    assert all(w.grad is None for w in weights) and len(calls) == 2 * len(batches)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for w, ref in zip(weights, unfused):
        torch.testing.assert_close(w.main_grad, ref, **tol)
    for i, w in enumerate(weights[1:], 1):
        assert torch.equal(w.main_grad[5], torch.full_like(w.main_grad[5], 0.5))  # the empty expert
        exact = torch.full(w.shape, 0.5, dtype=torch.float64)
        for dy, x, ends, main_grad in calls:
            if main_grad is w.main_grad:
                exact = reference(exact, dy, x, torch.diff(ends, prepend=ends.new_zeros(1)).tolist())
        err = (w.main_grad.double() - exact).abs().max().item()
        assert err < 1e-5 * exact.abs().max().item()  # fp32 rounding of exact products
        if dtype == BF16:
            assert err * 20 < (unfused[i].double() - exact).abs().max().item()  # no bf16 rounding per micro-batch


@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_mixtral_block_compiled_equals_eager(ckpt):
    """A whole bf16 mixtral block with the wgrad fusion (router, q/k/v, o and both stacked expert
    weights fused), under recompute or not: compiled (aot_eager, one graph: the custom op is opaque)
    gives eager's main_grads and input gradient; both match the unfused block's gradients."""
    from models.block_base import LayerOptions
    from models.pipeline import wgrad_fused_blocks

    args = mixtral.Args.from_hf_config(mixtral.tiny_hf_config())
    torch.manual_seed(0)
    plain = mixtral.Block(args, LayerOptions(grad_ckpt=ckpt)).to(BF16).train()
    x = torch.randn(2, 16, args.hidden_size, dtype=BF16)
    pos = torch.arange(16).expand(2, 16)
    stats, z, real = torch.zeros(2, args.num_experts), torch.zeros(1), torch.ones(2, 16, dtype=torch.int32)
    g = torch.randn_like(x)
    plain((x, pos, stats, z, real))[0].backward(g)
    results = []
    for compiled in (False, True):
        fused = copy.deepcopy(plain)
        fused.zero_grad(set_to_none=True)
        weights = wgrad_fused_blocks([fused])
        assert len(weights) == 5 and sum(w.dim() == 3 for w in weights) == 2
        for w in weights:
            w.main_grad = torch.zeros(w.shape)
        if compiled:
            fused.block = torch.compile(fused.block, backend="aot_eager", fullgraph=True)
        x_f = x.clone().requires_grad_()
        fused((x_f, pos, stats, z, real))[0].backward(g)
        assert all(w.grad is None for w in weights)
        results.append(([w.main_grad for w in weights], x_f.grad))
        by_id = {id(w) for w in weights}
        for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
            got = q.main_grad if id(q) in by_id else q.grad
            torch.testing.assert_close(got.float(), p.grad.float(), rtol=2e-2, atol=2e-2, msg=name)
    (mg_e, xg_e), (mg_c, xg_c) = results
    for a, b in zip(mg_c, mg_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(xg_c, xg_e, rtol=0, atol=0)


def test_triton_kernel_compiles_for_hopper():
    """The kernel compiled ahead of time for an H100/H200 (sm_90, Triton's bundled ptxas; no GPU
    needed) with the default block config: it builds, and its GEMM runs on the tensor cores (wgmma)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from models import grouped_wgrad

    bm, bn, bk, warps, stages = grouped_wgrad.CONFIGS[0]
    ints = ["M", "N", "stride_ge", "stride_gm", "stride_gn", "stride_dyt", "stride_dym", "stride_xt", "stride_xn"]
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "N_FASTEST": True, "UPCAST": False}
    signature = {"g_ptr": "*fp32", "dy_ptr": "*bf16", "x_ptr": "*bf16", "ends_ptr": "*i32",
                 **{n: "i32" for n in ints}, **{n: "constexpr" for n in consts}}
    src = triton.compiler.ASTSource(fn=grouped_wgrad._grouped_wgrad_kernel, signature=signature, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert "wgmma" in kernel.asm["ptx"] and kernel.asm["cubin"]
