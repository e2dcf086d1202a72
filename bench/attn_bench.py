"""Document-masked causal attention on one GPU: which kernel is fastest for packed rows.

The 7B shape (32 heads x 128, bf16), micro-batch rows of --seq tokens packed with documents of
log-normal length (median ~1k tokens, as bench_train.py's data), forward + backward. Each
variant's output is checked against FlexAttention's (the product's kernel), then timed
(median of CUDA-event timings). Variants that this torch lacks are reported and skipped.

    python bench/attn_bench.py [--seq 2048 --batch 4]
"""
from __future__ import annotations

import argparse
import inspect
import random
import statistics

import torch
import torch.nn.functional as F


def doc_lengths(rows: int, seq: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        row, left = [], seq
        while left > 0:
            n = min(left, max(16, int(rng.lognormvariate(6.9, 0.8))))
            row.append(n)
            left -= n
        out.append(row)
    return out


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of fn() (forward + backward) after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    a = p.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev, b, s, h, d = "cuda", a.batch, a.seq, a.heads, a.head_dim
    lengths = doc_lengths(b, s)
    pos = torch.tensor([[i for n in row for i in range(n)] for row in lengths], device=dev)
    doc = torch.cumsum((pos == 0).int(), -1)
    flat = [n for row in lengths for n in row]
    cu = torch.tensor([0] + list(torch.tensor(flat).cumsum(0)), dtype=torch.int32, device=dev)
    max_len = max(flat)
    # FLOPs actually needed: causal within each document, fwd 4*n^2/2*h*d, bwd 2.5x fwd
    flops = sum(3.5 * 4 * n * n / 2 * h * d for n in flat)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, generator=g)

    def mask_mod(bi, hi, qi, ki):
        return (qi >= ki) & (doc[bi, qi] == doc[bi, ki])

    block_mask = create_block_mask(mask_mod, b, None, s, s, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    variants = {}

    def flex_variant(opts):
        return lambda: flex(q, k, v, block_mask=block_mask, kernel_options=opts or None)

    variants["flex (default blocks)"] = flex_variant({})
    for opts in ({"BLOCK_M": 128, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 128},
                 {"USE_TMA": True}, {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 128,
                                     "BLOCK_M2": 128, "BLOCK_N2": 64}):
        variants["flex " + ",".join(f"{k}={v}" for k, v in opts.items())] = flex_variant(opts)

    def packed(x):  # [B, H, S, D] -> [B*S, H, D]
        return x.transpose(1, 2).reshape(b * s, h, d)

    def unpacked(x):
        return x.view(b, s, h, d).transpose(1, 2)

    try:
        from torch.nn.attention.varlen import varlen_attn
        causal = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
                  else {"window_size": (-1, 0)})
        variants["varlen_attn (flash, cu_seqlens)"] = lambda: unpacked(
            varlen_attn(packed(q), packed(k), packed(v), cu, cu, max_len, max_len, **causal))
    except ImportError as e:
        print("varlen_attn: not in this torch:", e)

    def aten_flash():
        out = torch.ops.aten._flash_attention_forward(packed(q), packed(k), packed(v), cu, cu, max_len, max_len,
                                                      0.0, True, False)[0]
        return unpacked(out)
    variants["aten._flash_attention_forward varlen"] = aten_flash

    def cudnn_varlen():
        out = torch.ops.aten._cudnn_attention_forward(packed(q), packed(k), packed(v), None, cu, cu, max_len, max_len,
                                                      True, 0.0, True)[0]
        return unpacked(out)
    variants["aten._cudnn_attention_forward varlen"] = cudnn_varlen
    try:  # flash-attn-4 (CuTe DSL; carried as wheels, bench/README.md): varlen over cu_seqlens
        from flash_attn.cute import flash_attn_varlen_func

        def fa4_varlen():
            out = flash_attn_varlen_func(packed(q), packed(k), packed(v), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                         max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True)
            return unpacked(out[0] if isinstance(out, tuple) else out)
        variants["flash-attn-4 varlen (CuTe)"] = fa4_varlen
    except ImportError as e:
        print("flash-attn-4: not installed:", e)
    variants["sdpa causal, no document mask (more FLOPs)"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    ref = variants["flex (default blocks)"]().detach()
    print(f"B={b} S={s} H={h} D={d}, {len(flat)} documents (median {statistics.median(flat)} tokens), "
          f"useful fwd+bwd {flops / 1e12:.2f} TFLOP")
    print(f"{'variant':58s} {'ms fwd+bwd':>10s} {'TFLOP/s':>8s} {'max|diff| vs flex':>18s}")
    for name, fn in variants.items():
        try:
            out = fn()
            diff = (out.float() - ref.float()).abs().max().item()
            ms = timed(lambda: fn().backward(grad))
            q.grad = k.grad = v.grad = None
            print(f"{name:58s} {ms:10.3f} {flops / ms / 1e9:8.0f} {diff:18.2e}")
        except Exception as e:  # a kernel this build lacks: say which and go on
            print(f"{name:58s} failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")


if __name__ == "__main__":
    main()
