"""Where fp8 trains faster than bf16, by hidden size and micro-batch: the table `fp8: auto` reads
(engine/plan.py FP8_SPEEDUP, issue 32).

One llama-shaped transformer block (models.llama.Block: the product's layer code, FlexAttention
over packed rows of log-normal document lengths, the block compiled as compile_blocks does), seq
2048, forward + backward, gradients handled as training does for each:
  bf16  the block linears' weight gradients added in fp32 into `main_grad` inside the GEMM (the
        product's default wgrad fusion), the other parameters' bf16 gradients fresh each step
  fp8   torchao float8 tensorwise on the block linears (models.pipeline.float8_blocks); every
        gradient bf16, then added into an fp32 buffer and freed (DeepSpeed's hook: fp8 runs unfused)
ratio = bf16 time / fp8 time (> 1: fp8 faster). Shapes: llama's hidden -> ffn, heads of 128 dims
(8 KV heads at 8192, as llama-2-70B). Each shape prints its row, then one line in the table's
literal form as soon as it is measured (a step cut short keeps what it measured):

    (4096, 4): 1.32,  # bf16 21.40 ms, fp8 16.21 ms: NVIDIA H100 80GB HBM3, torch 2.11.0

    python3 bench/fp8_sweep.py --hidden 4096 --micro 1,2        # GPU: one step of bench/steps_fp8.txt
    python3 bench/fp8_sweep.py --tiny                           # CPU smoke test (bf16 path only, no compile)
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import timed  # noqa: E402
from bench.ref_stage import positions  # noqa: E402
from models import llama  # noqa: E402
from models.attention import AttnOptions  # noqa: E402
from models.block_base import LayerOptions  # noqa: E402
from models.masks import attention_mask  # noqa: E402
from models.pipeline import float8_blocks, wgrad_fused_blocks  # noqa: E402

FFN = {2048: 5504, 4096: 11008, 5120: 13824, 8192: 28672}  # llama 1B (bench_train's preset), 7B, 13B, 70B


def block_args(hidden: int, tiny: bool) -> llama.Args:
    if tiny:
        return llama.Args.from_hf_config(llama.tiny_hf_config())
    heads = hidden // 128
    return llama.Args.from_hf_config(dict(
        model_type="llama", vocab_size=32000, hidden_size=hidden, intermediate_size=FFN.get(hidden, 8 * hidden // 3 // 256 * 256),
        num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=8 if hidden >= 8192 else heads,
        max_position_embeddings=4096))


def build(args, mode: str, dev: str, compiled: bool):
    opts = LayerOptions(attn=AttnOptions(packed=True, impl="flex" if dev == "cuda" else "sdpa"), compile=compiled)
    torch.manual_seed(0)
    with torch.device(dev):
        block = llama.Block(args, opts)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02) if p.ndim >= 2 else p.fill_(1.0)
    block = block.to(torch.bfloat16 if dev == "cuda" else torch.float32)
    if mode == "bf16":
        for w in wgrad_fused_blocks([block]):
            w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=dev)
        return block
    float8_blocks([block], "tensorwise")
    for p in block.parameters():  # DeepSpeed's path: bf16 grad added into fp32, then freed
        p.hp = torch.zeros(p.shape, dtype=torch.float32, device=dev)

        def add_and_free(q):
            q.hp.add_(q.grad.float())
            q.grad = None
        p.register_post_accumulate_grad_hook(add_and_free)
    return block




def measure(args, micro: int, seq: int, mode: str, dev: str, compiled: bool, iters: int, warmup: int, sync) -> float:
    block = build(args, mode, dev, compiled)
    dtype = next(block.parameters()).dtype
    pos = positions(micro, seq, True, random.Random(0)).to(dev)
    mask = attention_mask(pos, block.self_attn.attn)  # the product's document mask, built outside the block
    x = torch.randn(micro, seq, args.hidden_size, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    params = list(block.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        block.block(x, pos, mask).backward(g)
    return timed(step, iters, warmup, sync)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="2048,4096,5120,8192", help="hidden sizes, comma-separated")
    p.add_argument("--micro", default="1,2,4,8", help="micro-batch rows, comma-separated")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny llama block, bf16 path, no compile")
    a = p.parse_args(argv)
    try:
        a.hidden = [int(h) for h in a.hidden.split(",")]
        a.micro = [int(m) for m in a.micro.split(",")]
    except ValueError:
        p.error("--hidden and --micro: comma-separated integers")
    bad = [h for h in a.hidden if h % 128]
    if bad and not a.tiny:
        p.error(f"--hidden: multiples of 128 (heads of 128 dims), got {bad}")
    return a


def main(argv=None) -> list[str]:
    a = parse(argv)
    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if a.tiny:
        a.hidden, a.micro, a.seq, a.iters, a.warmup = [64], [1], 64, 1, 0
    where = f"{torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch {torch.__version__}"
    print(f"{where}; seq {a.seq}, one llama block fwd+bwd, compiled {on_gpu}, median of {a.iters}")
    print(f"{'hidden':>6s} {'micro':>5s} {'bf16 ms':>8s} {'fp8 ms':>8s} {'bf16/fp8':>9s}")
    rows = []
    for hidden in a.hidden:
        args = block_args(hidden, a.tiny)
        for micro in a.micro:
            t_bf16 = measure(args, micro, a.seq, "bf16", dev, on_gpu, a.iters, a.warmup, sync)
            if not on_gpu:  # torchao's float8 GEMMs need FP8 tensor cores
                print(f"{hidden:6d} {micro:5d} {t_bf16:8.2f} {'(GPU)':>8s}", flush=True)
                continue
            t_fp8 = measure(args, micro, a.seq, "fp8", dev, True, a.iters, a.warmup, sync)
            torch._dynamo.reset()
            print(f"{hidden:6d} {micro:5d} {t_bf16:8.2f} {t_fp8:8.2f} {t_bf16 / t_fp8:9.3f}", flush=True)
            rows.append(f"    ({hidden}, {micro}): {t_bf16 / t_fp8:.2f},  # bf16 {t_bf16:.2f} ms, fp8 {t_fp8:.2f} ms: {where}")
            print("FP8_SPEEDUP row:", rows[-1].strip(), flush=True)
    if rows:
        print("FP8_SPEEDUP = {  # seq %d, bench/fp8_sweep.py\n%s\n}" % (a.seq, "\n".join(rows)))
    return rows


if __name__ == "__main__":
    main()
