"""Why chatglm3's stage trails its reference more than llama's (issue 32): attention alone,
forward + backward, at each family's stage shape (micro 4 x seq 2048, head dim 128), three ways:

  flex gqa      the product's path for packed rows: FlexAttention with the document BlockMask and
                enable_gqa (models/attention.py local_attend)
  flex expanded the same with K/V expanded to every query head first (autograd sums their gradients)
  sdpa causal   the reference stage's path (bench/ref_stage.py --attn causal): SDPA, no document mask

Hypothesis: FlexAttention's backward runs dK/dV with one program per (KV block, batch, KV head),
each looping over all q heads of its group (torch/_inductor/kernel/flex/flex_attention.py
flex_attention_backward_grid); chatglm3 has 2 KV heads for 32 query heads, so that part has 16x
fewer, 16x longer programs than llama's (32 KV heads): too few to fill an H100's 132 SMs. If
`flex expanded` beats `flex gqa` at chatglm3's shape and not at llama's, expanding K/V for
large groups is the product-side fix.

    python3 bench/gqa_flex_bench.py             # GPU
    python3 bench/gqa_flex_bench.py --tiny      # CPU smoke test (tiny shapes, forward only: flex has no CPU backward)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import timed  # noqa: E402
from bench.ref_stage import positions  # noqa: E402  (log-normal document lengths, as the product's packed rows)
from models.attention import AttnOptions, attend  # noqa: E402
from models.masks import attention_mask  # noqa: E402

SHAPES = {  # name: (query heads, kv heads)
    "chatglm3-6b": (32, 2),
    "mixtral-8x7b": (32, 8),
    "llama-7b": (32, 32),
}




def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args(argv)
    import random

    on_gpu = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    b, s, d = (a.micro, a.seq, 128) if not a.tiny else (2, 128, 16)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    pos = positions(b, s, True, random.Random(0)).to(dev)
    flex = AttnOptions(packed=True, impl="flex")
    mask = attention_mask(pos, flex)
    print(f"device {torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch {torch.__version__}, micro {b} x seq {s}, "
          f"head dim {d}, {dtype}, {'fwd+bwd' if on_gpu else 'forward only'}, median of {a.iters}")
    print(f"{'shape':14s} {'heads':>6s} {'kv':>4s} {'flex gqa ms':>12s} {'flex expanded ms':>17s} {'sdpa causal ms':>15s}")
    for name, (h, kv) in SHAPES.items():
        if a.tiny:
            h, kv = h // 8, max(1, kv // 8)
        g = torch.Generator(dev).manual_seed(0)
        q, k, v = (torch.randn(b, n, s, d, device=dev, dtype=dtype, generator=g, requires_grad=on_gpu)
                   for n in (h, kv, kv))
        go = torch.randn(b, s, h * d, device=dev, dtype=dtype, generator=g)

        def backward(out):
            if on_gpu:
                out.backward(go)

        def gqa():
            backward(attend(q, k, v, mask, flex))

        def expanded():
            rep = h // kv
            ke, ve = (t[:, :, None].expand(b, kv, rep, s, d).reshape(b, h, s, d) for t in (k, v))
            backward(attend(q, ke, ve, mask, flex))

        def causal():
            backward(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h).transpose(1, 2)
                     .reshape(b, s, h * d))

        ts = [timed(fn, a.iters, 2, sync) for fn in (gqa, expanded, causal)]
        print(f"{name:14s} {h:6d} {kv:4d} {ts[0]:12.3f} {ts[1]:17.3f} {ts[2]:15.3f}", flush=True)


if __name__ == "__main__":
    main()
