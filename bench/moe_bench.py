"""The MoE layer against the dense MLP it replaces, on training's path (issues 25 and 32).

models.mixtral.SparseMoE (grouped GEMMs on the experts stored stacked) vs one dense SwiGLU MLP
(models.norm_mlp.GatedMLP, fused gate/up) of the same hidden/ffn run on top_k x tokens tokens: the
same matmul FLOPs as the experts do, so dense time / MoE time is the MoE layer's efficiency (issue
32's targets, production mode: >= 0.85 at 2048 tokens, >= 0.95 at 8192). Mixtral-8x7B shape (h 4096,
ffn 14336, 8 experts, top 2), bf16, forward + backward.

Gradient modes (--modes), each timed step as training runs it:
  bf16      fresh bf16 `.grad` every step (set to None before it: no add into an old gradient)
  fp32      training's default (wgrad_fusion: true): every weight's gradient added in fp32 into its
            `main_grad` inside the weight-gradient GEMM: the dense MLP's linears (fused_linear.py, cuBLAS
            with an fp32 C) and the MoE's router and stacked experts (grouped_wgrad.py: Triton on CUDA)
  fp32-hook the experts as before issue 32: a bf16 gradient, then added into the fp32 buffer and freed
            (DeepSpeed's hook, as a post-accumulate-grad hook); the dense side as in fp32
--compile on adds the fp32 mode compiled (torch.compile of forward + backward); only: that alone.

Then a per-GEMM table (--gemm-table): each of the layer's six GEMMs (two forward, two input
gradients, two weight gradients, the latter accumulated in fp32 as training does and also as bf16
outputs) timed alone, TFLOP/s, against the dense GEMM of the same FLOPs; and on CUDA the Triton
grouped wgrad's block configs (models.grouped_wgrad.CONFIGS, the first is the default) one by one.

Also checks that the grouped and loop paths agree (forward, and gradients with one expert no token
picks: its weight gradients exactly zero), and on CUDA that a forward + backward never syncs with
the host, unfused and fused (torch.cuda.set_sync_debug_mode("error") raises on any sync).

    python3 bench/moe_bench.py                          # GPU: all of the above at 2048 and 8192 tokens
    python3 bench/moe_bench.py --compile only --no-gemm-table
    python3 bench/moe_bench.py --tiny --iters 1 --warmup 0 --compile off   # CPU smoke test (tests/test_moe_bench.py)
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import timed  # noqa: E402
from models import grouped_wgrad, mixtral  # noqa: E402
from models.fused_linear import fuse_wgrad, wgrad_accumulate  # noqa: E402
from models.norm_mlp import GatedMLP  # noqa: E402

MODES = ("bf16", "fp32", "fp32-hook")


def moe_args(hidden: int, ffn: int, experts: int, top_k: int) -> mixtral.Args:
    cfg = mixtral.tiny_hf_config(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                                 num_experts_per_tok=top_k, num_attention_heads=max(1, hidden // 128),
                                 num_key_value_heads=max(1, hidden // 512))
    return mixtral.Args.from_hf_config(cfg)


class Loop(torch.nn.Module):
    """SparseMoE forced onto its per-expert loop (the pre-grouped-GEMM code path)."""

    def __init__(self, moe: mixtral.SparseMoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        orig = mixtral.grouped_mm
        mixtral.grouped_mm = lambda *a: False
        try:
            return self.moe(x)
        finally:
            mixtral.grouped_mm = orig


def with_grad_mode(layer: torch.nn.Module, mode: str, moe: bool) -> torch.nn.Module:
    """A copy of `layer` set up for gradient mode `mode` (module docstring); fp32 buffers zeroed."""
    layer = copy.deepcopy(layer)
    if mode == "bf16":
        return layer
    for w in fuse_wgrad(layer):
        buffer = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        if not (moe and mode == "fp32-hook" and w.dim() == 3):
            w.main_grad = buffer
            continue
        w.hook_buffer = buffer  # DeepSpeed's path: the bf16 .grad added into the fp32 buffer, then freed

        def add_and_free(p):
            p.hook_buffer.add_(p.grad.float())
            p.grad = None

        w.register_post_accumulate_grad_hook(add_and_free)
    return layer


def step_fn(layer, compiled: bool):
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd_bwd(x, g):
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * g).sum().backward()

    run = torch.compile(fwd_bwd) if compiled else fwd_bwd

    def step(x, g):
        for p in params:  # fresh gradients each step, as training's (DeepSpeed frees them after its hook)
            p.grad = None
        x.grad = None
        run(x, g)
    return step




def check_agreement(moe, tokens: int, hidden: int, experts: int, dev: str, dtype) -> bool:
    """Grouped vs loop: forward, and gradients with one expert no token picks (an empty group: its
    weight gradients must be exactly zero; pytorch#172439: not so on Blackwell)."""
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    with torch.no_grad():
        o1, s1, z1 = moe(x)
        o2, s2, z2 = Loop(moe)(x)
    rel = ((o1.float() - o2.float()).norm() / o2.float().norm()).item()
    print(f"grouped vs loop: output rel {rel:.2e}, stats equal {torch.equal(s1, s2)}, z equal {torch.equal(z1, z2)}")
    ok = rel < (2e-2 if dtype == torch.bfloat16 else 1e-5) and torch.equal(s1, s2)
    hook = moe.gate.register_forward_hook(lambda m, a, out: out - 1e4 * (torch.arange(experts, device=out.device)
                                                                       == experts - 1))
    grads = []
    for layer in (moe, Loop(moe)):
        for p in moe.parameters():
            p.grad = None
        xg = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=torch.Generator(dev).manual_seed(1))
        xg.requires_grad_()
        out = layer(xg)[0]
        (out.float() * torch.linspace(-1, 1, out.numel(), device=dev).view_as(out)).sum().backward()
        grads.append([xg.grad.float()] + [p.grad.float() for p in moe.parameters()])
    hook.remove()
    grel = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(*grads) if b.norm() > 0)
    empty_zero = all(not p.grad[-1].any() for p in moe.experts.parameters())  # the last expert's slices
    print(f"grouped vs loop backward: max grad rel {grel:.2e}; unpicked expert's weight grads all zero: {empty_zero}")
    for p in moe.parameters():
        p.grad = None
    return ok and grel < (5e-2 if dtype == torch.bfloat16 else 1e-5) and empty_zero


def check_no_sync(moe, tokens: int, hidden: int, dtype) -> bool:
    """No host sync in the grouped layer's forward + backward, unfused (bf16) and fused (fp32)."""
    ok = True
    for mode in ("bf16", "fp32"):
        x = torch.randn(tokens, hidden, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        step = step_fn(with_grad_mode(moe, mode, moe=True), compiled=False)
        step(x, g)  # warm (allocator, lazy init, Triton's compile)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(x, g)
            print(f"host sync check ({mode} grads): PASS (forward + backward ran under set_sync_debug_mode('error'))")
        except RuntimeError as e:
            print(f"host sync check ({mode} grads): FAIL ({str(e).splitlines()[0]})")
            ok = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return ok


def layer_table(moe, dense, tokens, modes, compile_mode, top_k, hidden, dev, dtype, iters, warmup, sync, legacy):
    print(f"{'tokens':>7s} {'grads':9s} {'mode':9s} {'dense ms':>9s} {'MoE ms':>9s} {'dense/MoE':>10s}"
          + (f" {'loop ms':>8s} {'loop/dense':>11s}" if legacy else ""))
    print("  dense/MoE = dense time / MoE time, the dense MLP on top_k x tokens (targets, fp32 grads: >= 0.85 at "
          "2048, >= 0.95 at 8192); grads: see the module docstring")
    runs = [(m, False) for m in modes] if compile_mode != "only" else []
    if compile_mode in ("on", "only"):
        runs.append(("fp32", True))
    for n in tokens:
        x = torch.randn(n, hidden, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        xd = torch.randn(top_k * n, hidden, device=dev, dtype=dtype, requires_grad=True)
        gd = torch.randn_like(xd)
        for mode, compiled in runs:
            torch._dynamo.reset()
            d, m = with_grad_mode(dense, mode, moe=False), with_grad_mode(moe, mode, moe=True)
            dense_step, moe_step = step_fn(d, compiled), step_fn(m, compiled)
            t_dense = timed(lambda: dense_step(xd, gd), iters, warmup, sync)
            t_moe = timed(lambda: moe_step(x, g), iters, warmup, sync)
            line = (f"{n:7d} {mode:9s} {'compiled' if compiled else 'eager':9s} {t_dense:9.2f} {t_moe:9.2f} "
                    f"{t_dense / t_moe:10.3f}")
            if legacy and mode == "bf16" and not compiled:  # the per-expert loop syncs: eager only
                loop_step = step_fn(Loop(m), False)
                t_loop = timed(lambda: loop_step(x, g), iters, warmup, sync)
                line += f" {t_loop:8.2f} {t_dense / t_loop:11.3f}"
            print(line, flush=True)
            del d, m


def gemm_table(moe, tokens, top_k, hidden, ffn, dev, dtype, iters, warmup, sync) -> None:
    """Each GEMM of the layer alone: grouped (the routing of random tokens by the layer's router)
    vs the dense GEMM of the same FLOPs (the dense MLP's on top_k x tokens rows)."""
    w13, w2 = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
    dense13 = torch.randn(2 * ffn, hidden, device=dev, dtype=dtype)
    dense2 = torch.randn(hidden, ffn, device=dev, dtype=dtype)
    mg13, mg2 = (torch.zeros(w.shape, device=dev) for w in (w13, w2))
    dmg13, dmg2 = (torch.zeros(w.shape, device=dev) for w in (dense13, dense2))
    print(f"{'tokens':>7s} {'GEMM':22s} {'MoE ms':>8s} {'MoE TF/s':>9s} {'dense ms':>9s} {'dense TF/s':>11s} "
          f"{'dense/MoE':>10s}")
    for n in tokens:
        with torch.no_grad():
            _, _, _, flat, routed = moe.route(torch.randn(n, hidden, device=dev, dtype=dtype))
        ends = routed.cumsum(0).to(torch.int32)
        rows = top_k * n
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        h = torch.randn(rows, ffn, device=dev, dtype=dtype)
        dy13 = torch.randn(rows, 2 * ffn, device=dev, dtype=dtype)
        dy2 = torch.randn(rows, hidden, device=dev, dtype=dtype)
        cases = [  # name, FLOPs, MoE fn, dense fn
            ("fwd gate_up", 2 * rows * hidden * 2 * ffn, lambda: torch._grouped_mm(x, w13.transpose(-2, -1), offs=ends),
             lambda: x @ dense13.t()),
            ("fwd down", 2 * rows * ffn * hidden, lambda: torch._grouped_mm(h, w2.transpose(-2, -1), offs=ends),
             lambda: h @ dense2.t()),
            ("dgrad gate_up", 2 * rows * hidden * 2 * ffn, lambda: torch._grouped_mm(dy13, w13, offs=ends),
             lambda: dy13 @ dense13),
            ("dgrad down", 2 * rows * ffn * hidden, lambda: torch._grouped_mm(dy2, w2, offs=ends),
             lambda: dy2 @ dense2),
            ("wgrad gate_up fp32 acc", 2 * rows * hidden * 2 * ffn,
             lambda: grouped_wgrad.grouped_wgrad_accumulate(mg13, dy13, x, ends),
             lambda: wgrad_accumulate(dmg13, dy13, x)),
            ("wgrad down fp32 acc", 2 * rows * ffn * hidden,
             lambda: grouped_wgrad.grouped_wgrad_accumulate(mg2, dy2, h, ends),
             lambda: wgrad_accumulate(dmg2, dy2, h)),
            ("wgrad gate_up bf16 out", 2 * rows * hidden * 2 * ffn,
             lambda: torch._grouped_mm(dy13.t(), x, offs=ends), lambda: dy13.t() @ x),
            ("wgrad down bf16 out", 2 * rows * ffn * hidden,
             lambda: torch._grouped_mm(dy2.t(), h, offs=ends), lambda: dy2.t() @ h),
        ]
        for name, flops, moe_fn, dense_fn in cases:
            t_moe, t_dense = (timed(f, iters, warmup, sync) for f in (moe_fn, dense_fn))
            print(f"{n:7d} {name:22s} {t_moe:8.3f} {flops / t_moe / 1e9:9.1f} {t_dense:9.3f} "
                  f"{flops / t_dense / 1e9:11.1f} {t_dense / t_moe:10.3f}", flush=True)
        if dev == "cuda" and grouped_wgrad.available():
            for cfg in grouped_wgrad.CONFIGS:
                ts = [timed(lambda: grouped_wgrad.triton_grouped_wgrad(mg, dy, a, ends, config=cfg), iters, warmup, sync)
                      for mg, dy, a in ((mg13, dy13, x), (mg2, dy2, h))]
                tf = [2 * rows * hidden * 2 * ffn / ts[0] / 1e9, 2 * rows * ffn * hidden / ts[1] / 1e9]
                print(f"{n:7d} triton wgrad config {cfg}: gate_up {ts[0]:.3f} ms {tf[0]:.1f} TF/s, down {ts[1]:.3f} ms "
                      f"{tf[1]:.1f} TF/s{' (default)' if cfg == grouped_wgrad.CONFIGS[0] else ''}", flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--tokens", default=None, help="token counts (default 2048,8192: 1 x 2048, 4 x 2048; --tiny: 64,256)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help=f"gradient modes, comma-separated: {', '.join(MODES)}")
    p.add_argument("--compile", choices=("off", "on", "only"), default="on",
                   help="on: also the fp32 mode compiled; only: that alone")
    p.add_argument("--no-gemm-table", dest="gemm_table", action="store_false", help="skip the per-GEMM table")
    p.add_argument("--legacy", action="store_true", help="also time the per-expert loop (bf16 mode, eager)")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
    a.modes = modes
    try:
        a.tokens = [int(t) for t in (a.tokens or ("64,256" if a.tiny else "2048,8192")).split(",")]
    except ValueError:
        p.error(f"--tokens: comma-separated integers, got {a.tokens!r}")
    return a


def main(argv=None) -> bool:
    a = parse(argv)
    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    if a.tiny:
        hidden, ffn, experts, top_k, dtype = 64, 96, 8, 2, torch.bfloat16
    else:
        hidden, ffn, experts, top_k, dtype = 4096, 14336, 8, 2, torch.bfloat16
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    args = moe_args(hidden, ffn, experts, top_k)
    torch.manual_seed(0)
    with torch.device(dev):
        moe = mixtral.SparseMoE(args).to(dtype)
        dense = GatedMLP(hidden, ffn).to(dtype)
        for m in (moe, dense):
            with torch.no_grad():
                for w in m.parameters():
                    w.normal_(0, 0.02)
    wgrad = "triton" if on_gpu and grouped_wgrad.available() else "torch fallback"
    print(f"device {torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch {torch.__version__}, "
          f"h {hidden} ffn {ffn} experts {experts} top {top_k} {dtype}, fwd+bwd, median of {a.iters}; "
          f"fused expert wgrad: {wgrad}")
    print(f"grouped GEMM path taken: {mixtral.grouped_mm(torch.zeros(1, hidden, dtype=dtype, device=dev), moe.experts.gate_up_proj)}")
    ok = check_agreement(moe, a.tokens[0], hidden, experts, dev, dtype)
    if on_gpu:
        ok &= check_no_sync(moe, a.tokens[0], hidden, dtype)
    layer_table(moe, dense, a.tokens, a.modes, a.compile, top_k, hidden, dev, dtype, a.iters, a.warmup, sync, a.legacy)
    if a.gemm_table:
        gemm_table(moe, a.tokens, top_k, hidden, ffn, dev, dtype, a.iters, a.warmup, sync)
    print("MOE BENCH", "PASS" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
