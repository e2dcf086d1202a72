"""The MoE layer against the dense MLP it replaces (issue 25's MoE target).

models.mixtral.SparseMoE (grouped GEMM on the experts stored stacked, the default path) and its
per-expert loop fallback vs one dense SwiGLU MLP (models.norm_mlp.GatedMLP, fused gate/up) of the same hidden/ffn run on
top_k x tokens tokens: the same matmul FLOPs as the experts do, so dense time / MoE time is the
MoE layer's efficiency (target >= 0.95 at 4 x 2048 tokens, >= 0.85 at 1 x 2048). Mixtral-8x7B
shape (h 4096, ffn 14336, 8 experts, top 2), bf16, forward + backward, eager and torch.compile.

The `perfwd` column is the grouped path with the previous layout's cost added back: expert weights
held per expert and stacked on every forward (a copy of the layer's expert weights, ~2.8 GB at
this shape, and the split of their gradients in backward), for comparison.

Also checks that a forward + backward of the grouped layer never syncs with the host
(torch.cuda.set_sync_debug_mode("error") raises on any sync), and that grouped and loop agree.

    python3 bench/moe_bench.py                  # GPU: Mixtral-8x7B shape, 2048 and 8192 tokens
    python3 bench/moe_bench.py --tiny           # CPU smoke test: tiny shape
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import mixtral  # noqa: E402
from models.norm_mlp import GatedMLP  # noqa: E402


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


class PerForwardStack(torch.nn.Module):
    """The grouped path as it ran before the experts were stored stacked: one w1/w3/w2 parameter
    per expert, stacked into [E, 2*ffn, h] and [E, h, ffn] on every forward."""

    def __init__(self, moe: mixtral.SparseMoE):
        super().__init__()
        self.moe = moe
        experts = moe.experts
        with torch.no_grad():
            w1, w3 = experts.gate_up_proj.detach().chunk(2, dim=1)
            self.w1, self.w3, self.w2 = (torch.nn.ParameterList(torch.nn.Parameter(t.clone()) for t in w)
                                         for w in (w1, w3, experts.down_proj.detach()))

    def forward(self, x):
        logits, probs, weights, flat, routed = self.moe.route(x)
        w13 = torch.stack([w for pair in zip(self.w1, self.w3) for w in pair])  # [2E, ffn, h]
        w13 = w13.view(len(self.w1), 2 * w13.shape[1], w13.shape[2])
        w2 = torch.stack(list(self.w2))
        return mixtral.grouped_experts(x, flat, routed, weights, w13, w2, self.moe.top_k)


def step_fn(layer, compiled: bool):
    def fwd_bwd(x, g):
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * g).sum().backward()
    # the loop path syncs per layer (graph break at .tolist()); compiled it runs as several graphs
    return torch.compile(fwd_bwd) if compiled else fwd_bwd


def timed(fn, x, g, iters: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn(x, g)
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn(x, g)
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--tokens", default="2048,8192", help="token counts (1 x 2048, 4 x 2048)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    if a.tiny:
        hidden, ffn, experts, top_k, dtype = 64, 96, 8, 2, torch.bfloat16
        tokens = [64, 256]
        a.iters, a.warmup = min(a.iters, 3), min(a.warmup, 1)
    else:
        hidden, ffn, experts, top_k, dtype = 4096, 14336, 8, 2, torch.bfloat16
        tokens = [int(t) for t in a.tokens.split(",")]
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
    print(f"device {torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch {torch.__version__}, "
          f"h {hidden} ffn {ffn} experts {experts} top {top_k} {dtype}, fwd+bwd, median of {a.iters}")
    print(f"grouped GEMM path taken: {mixtral.grouped_mm(torch.zeros(1, hidden, dtype=dtype, device=dev), moe.experts.gate_up_proj)}")

    # agreement: grouped vs loop on the same inputs (forward)
    x = torch.randn(tokens[0], hidden, device=dev, dtype=dtype)
    with torch.no_grad():
        o1, s1, z1 = moe(x)
        o2, s2, z2 = Loop(moe)(x)
    rel = ((o1.float() - o2.float()).norm() / o2.float().norm()).item()
    print(f"grouped vs loop: output rel {rel:.2e}, stats equal {torch.equal(s1, s2)}, z equal {torch.equal(z1, z2)}")
    ok = rel < (2e-2 if dtype == torch.bfloat16 else 1e-5) and torch.equal(s1, s2)

    # gradients, with one expert that no token picks (an empty group: its weight gradient must be
    # exactly zero; pytorch#172439: not so on Blackwell)
    hook = moe.gate.register_forward_hook(lambda m, a, out: out - 1e4 * (torch.arange(experts, device=out.device)
                                                                       == experts - 1))
    grads = []
    for layer in (moe, Loop(moe)):
        for p in moe.parameters():
            p.grad = None
        xg = torch.randn(tokens[0], hidden, device=dev, dtype=dtype, generator=torch.Generator(dev).manual_seed(1))
        xg.requires_grad_()
        out = layer(xg)[0]
        (out.float() * torch.linspace(-1, 1, out.numel(), device=dev).view_as(out)).sum().backward()
        grads.append([xg.grad.float()] + [p.grad.float() for p in moe.parameters()])
    hook.remove()
    grel = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(*grads) if b.norm() > 0)
    empty_zero = all(not p.grad[-1].any() for p in moe.experts.parameters())  # the last expert's slices
    print(f"grouped vs loop backward: max grad rel {grel:.2e}; unpicked expert's weight grads all zero: {empty_zero}")
    ok &= grel < (5e-2 if dtype == torch.bfloat16 else 1e-5) and empty_zero
    for p in moe.parameters():
        p.grad = None

    if on_gpu:  # no host sync anywhere in the grouped layer's forward + backward
        x = torch.randn(tokens[0], hidden, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        fwd_bwd = step_fn(moe, compiled=False)
        fwd_bwd(x, g)  # warm (allocator, lazy init)
        sync()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fwd_bwd(x, g)
            print("host sync check: PASS (forward + backward ran under set_sync_debug_mode('error'))")
        except RuntimeError as e:
            print(f"host sync check: FAIL ({str(e).splitlines()[0]})")
            ok = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sync()

    modes = [False] if a.no_compile else [False, True]
    stacked = PerForwardStack(moe)
    print(f"{'tokens':>7s} {'mode':9s} {'dense ms':>9s} {'grouped ms':>11s} {'loop ms':>8s} {'perfwd ms':>10s} "
          f"{'grouped/dense':>14s} {'loop/dense':>11s} {'perfwd/dense':>13s}")
    print("  ratio = dense time / MoE time, the dense MLP on top_k x tokens (target >= 0.95 at 8192, >= 0.85 at 2048); "
          "perfwd = grouped with the expert weights stacked per forward (the previous layout)")
    for n in tokens:
        x = torch.randn(n, hidden, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        xd = torch.randn(top_k * n, hidden, device=dev, dtype=dtype, requires_grad=True)
        gd = torch.randn_like(xd)
        for compiled in modes:
            torch._dynamo.reset()
            t_dense = timed(step_fn(dense, compiled), xd, gd, a.iters, a.warmup, sync)
            t_grouped = timed(step_fn(moe, compiled), x, g, a.iters, a.warmup, sync)
            # the loop compiled: a graph break and a recompile per new set of group sizes; eager only
            t_loop = float("nan") if compiled else timed(step_fn(Loop(moe), False), x, g, a.iters, a.warmup, sync)
            t_pre = timed(step_fn(stacked, compiled), x, g, a.iters, a.warmup, sync)
            mode = "compiled" if compiled else "eager"
            print(f"{n:7d} {mode:9s} {t_dense:9.2f} {t_grouped:11.2f} {t_loop:8.2f} {t_pre:10.2f} "
                  f"{t_dense / t_grouped:14.3f} {t_dense / t_loop:11.3f} {t_dense / t_pre:13.3f}", flush=True)
            for p in [*moe.parameters(), *stacked.parameters(), *dense.parameters()]:
                p.grad = None
    print("MOE BENCH", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
