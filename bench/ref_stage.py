"""A plain reference stage: one family's layers in a minimal training loop, no data pipeline.

What one pp=2 stage of the 7B shape computes (embedding + --layers blocks + norm/head), on
random tokens (`--family`: each family's stage-sized slice, bench_train.FAMILY_SHAPES; MFU from
6 * N_active + attention as the product's metrics), with the product's layer math (the family's
module, compiled blocks, fused
projections, compiled loss) and nothing else: no DeepSpeed, no dataset, no metrics. bf16
parameters, gradients summed over the micro-batches in bf16 (or in fp32 buffers with
--accum fp32, as the product's default does), then AdamW on fp32 master weights. Its rate is
the yardstick for the product's path (bench_train.py): run_gpu.sh prints product / reference.

    python bench/ref_stage.py --name ref_mb4 --micro 4 --accum 8 [--fp8 tensorwise] [--attn flex]

--attn causal: SDPA causal over whole rows (no document mask); flex: FlexAttention with a
document mask over log-normal document lengths (the product's kernel for packed rows).
Writes <out>/ref/<name>.json and prints one line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_train import FAMILY_SHAPES, SHAPES, family_config  # noqa: E402
from models import family_for_hf_config  # noqa: E402
from models.attention import AttnOptions  # noqa: E402
from models.block_base import LayerOptions  # noqa: E402
from models.pipeline import SequentialModel, float8_blocks, liger_blocks, liger_loss, training_loss  # noqa: E402


def positions(rows: int, seq: int, packed: bool, rng: random.Random) -> torch.Tensor:
    """Position ids of a micro-batch: restart at 0 per document (log-normal lengths) when packed."""
    if not packed:
        return torch.arange(seq).expand(rows, seq).clone()
    out = []
    for _ in range(rows):
        row = []
        while len(row) < seq:
            row += range(max(16, int(rng.lognormvariate(6.9, 0.8))))
        out.append(row[:seq])
    return torch.tensor(out)


def run(a) -> dict:
    if a.unfused:  # the 'before' of the fused-projection A/B (bench/unfused.py)
        from bench.unfused import patch
        patch()
    # llama: 16 blocks unless --layers, whatever the --shape preset (this script's default so far)
    cfg = family_config(a.family, a.shape, a.layers or (16 if a.family == "llama-7b" else None))
    fam = family_for_hf_config(cfg)
    args = fam.Args.from_hf_config(cfg)
    packed = a.attn != "causal"
    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    opts = LayerOptions(attn=AttnOptions(packed=packed, impl=a.attn if packed and on_gpu else "sdpa"),
                        compile=on_gpu, fp8=a.fp8, fp8_head=a.fp8_head, kernels=a.kernels)
    with torch.device(dev):  # built and initialised where it runs (a CPU init of 3.4B weights is slow)
        model = SequentialModel(fam, args, opts)
        gen = torch.Generator(dev).manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=gen) if p.ndim >= 2 else p.fill_(1.0)
    model = model.to(torch.bfloat16 if on_gpu else torch.float32)  # as DeepSpeed's bf16 engine casts it
    float8_blocks(model.children(), a.fp8, head=a.fp8_head)
    if a.kernels == "liger":  # the product's `kernels: liger` (models.pipeline.build_pipeline does the same)
        liger_blocks(model.children(), fused_loss=liger_loss(fam, opts))
    loss_fn = training_loss(fam, args, opts)
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(masters, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=on_gpu)
    acc = [torch.zeros_like(m) for m in masters] if a.accum_dtype == "fp32" else None
    if acc is not None:  # the product's default: each gradient added into fp32 as produced, then freed
        for p, buf in zip(params, acc):
            def hook(p, buf=buf):
                buf.add_(p.grad)
                p.grad = None
            p.register_post_accumulate_grad_hook(hook)
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    tokens = a.micro * a.seq * a.accum
    times, losses = [], []
    for step in range(a.steps):
        batches = [(torch.randint(3, args.vocab_size, (a.micro, a.seq), generator=g),
                    positions(a.micro, a.seq, packed, rng)) for _ in range(a.accum)]
        batches = [(ids.to(dev, non_blocking=True), pos.to(dev, non_blocking=True)) for ids, pos in batches]
        scale = torch.tensor(1.0 / tokens, device=dev)
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for ids, pos in batches:
            labels = torch.roll(ids, -1, dims=1)
            loss = loss_fn(model(ids, pos), (labels, scale))
            loss.backward()
            total += loss.detach()
        for m, p, i in zip(masters, params, range(len(params))):
            m.grad = acc[i] if acc is not None else p.grad.float()
        opt.step()
        with torch.no_grad():
            for m, p in zip(masters, params):
                p.copy_(m)
                p.grad = None
        for buf in acc or []:
            buf.zero_()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(total))
    timed = times[a.warmup:] or times
    dt = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
    from engine.training.metrics import PEAK_FLOPS, flops_per_token

    n_params = sum(p.numel() for p in model.parameters())  # a tied twin counts once (one Parameter)
    mfu = tokens / dt * flops_per_token(fam.dims(args), n_params, a.seq) / PEAK_FLOPS
    return {"name": a.name, "family": a.family, "mfu": mfu, "params": n_params, "tok_s": tokens / dt, "step_s": dt, "peak_gib": round(peak, 1), "loss": losses[-1],
            "micro": a.micro, "accum": a.accum, "seq": a.seq, "fp8": a.fp8, "fp8_head": a.fp8_head, "kernels": a.kernels, "attn": a.attn,
            "accum_dtype": a.accum_dtype, "layers": args.num_layers, "unfused": a.unfused}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--name", default="ref")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="llama-7b presets (16 blocks unless --layers)")
    p.add_argument("--family", choices=list(FAMILY_SHAPES), default="llama-7b")
    p.add_argument("--layers", type=int, default=None, help="blocks (default: the family's stage-sized count)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fp8", choices=["off", "tensorwise", "rowwise", "rowwise_with_gw_hp"], default="off")
    p.add_argument("--fp8-head", action="store_true", help="the head's lm_head in FP8 too (config key fp8_head)")
    p.add_argument("--kernels", choices=["inductor", "liger"], default="inductor",
                   help="liger: liger-kernel's RMSNorm, SwiGLU, rotary and fused linear cross-entropy (config key kernels)")
    p.add_argument("--attn", choices=["causal", "flex"], default="causal")
    p.add_argument("--accum-dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--unfused", action="store_true", help="q/k/v and gate/up as separate GEMMs (bench/unfused.py)")
    a = p.parse_args()
    r = run(a)
    out = Path(a.out) / "ref"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(r))
    print(f"{r['name']} ({r['family']}, {r['params'] / 1e9:.2f}B params): {r['tok_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%, step {r['step_s']:.2f} s, peak {r['peak_gib']} GiB, loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
