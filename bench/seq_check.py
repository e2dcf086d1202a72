"""Sequence parallelism on GPUs (NCCL): attend with the seq axis equals the unsharded call, outputs and
q/k/v gradients, on the paths the CPU tests cannot run backward through (FlexAttention with the document
BlockMask, GQA, ALiBi as a score_mod), eager and inside torch.compile (inductor), fp32 (no TF32) and bf16.
One PASS/FAIL line per case; exit 1 on any FAIL. Without a GPU (gloo) only the SDPA case runs, eager, fp32.

    torchrun --nproc_per_node 2 bench/seq_check.py      (or 4: KV heads repeated where 4 does not divide them)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (name, impl, heads, kv heads, alibi)
CASES = [("flex-packed", "flex", 8, 8, False), ("flex-packed-gqa", "flex", 8, 2, False),
         ("flex-alibi", "flex", 8, 8, True), ("sdpa-packed-gqa", "sdpa", 8, 2, False)]
B, S, D = 2, 1024, 64
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # max |diff| / max |reference|


def main() -> int:
    from engine import distributed as Dist

    Dist.init_distributed()
    from models.attention import AttnOptions, attend
    from models.masks import attention_mask
    from models.positions import alibi_bias, alibi_slopes
    from models.sequence_parallel import make_group

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    seq = make_group(Dist.world_size(), Dist.world_size())
    gpu = torch.cuda.is_available()  # a CPU run (gloo) checks the script itself: SDPA only, eager
    n, dev = seq.size, torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    sl = slice(seq.rank * S // n, (seq.rank + 1) * S // n)
    pos = torch.cat([torch.cat([torch.arange(k) for k in lens])[None] for lens in ((300, 500, 224), (1000, 24))]).to(dev)
    failed = 0
    for dtype in (torch.float32, torch.bfloat16) if gpu else (torch.float32,):
        for compiled in (False, True) if gpu else (False,):
            for name, impl, h, h_kv, alibi in CASES if gpu else [c for c in CASES if c[1] != "flex"]:
                gen = torch.Generator(device=dev).manual_seed(0)
                q, k, v = (torch.randn(B, x, S, D, generator=gen, device=dev, dtype=dtype) for x in (h, h_kv, h_kv))
                w = torch.randn(B, S, h * D, generator=gen, device=dev, dtype=dtype)
                bias_of = (lambda p: alibi_bias(alibi_slopes(h), p)) if alibi else (lambda p: None)
                opts, sopts = AttnOptions(packed=True, impl=impl), AttnOptions(packed=True, impl=impl, seq=seq)
                fn = torch.compile(attend, dynamic=False) if compiled else attend
                ref = [t.clone().requires_grad_() for t in (q, k, v)]
                full = fn(*ref, attention_mask(pos, opts), opts, bias=bias_of(pos))
                (full.float() * w.float()).sum().backward()
                mine = [t[:, :, sl].clone().requires_grad_() for t in (q, k, v)]
                part = fn(*mine, attention_mask(pos[:, sl].clone(), sopts), sopts, bias=bias_of(pos[:, sl]))
                (part.float() * w[:, sl].float()).sum().backward()
                errs = {"out": _rel(part, full[:, sl])}
                errs.update({f"d{x}": _rel(m.grad, r.grad[:, :, sl]) for x, m, r in zip("qkv", mine, ref)})
                ok = max(errs.values()) < TOL[dtype] and all(float(m.grad.abs().max()) > 0 for m in mine)
                failed += not ok
                if seq.rank == 0:
                    print(f"{'PASS' if ok else 'FAIL'} seq {n} {name} {str(dtype)[6:]} {'compiled' if compiled else 'eager'}: "
                          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
                torch._dynamo.reset()
    return 1 if failed else 0


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


if __name__ == "__main__":
    sys.exit(main())
