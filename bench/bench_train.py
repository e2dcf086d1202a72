"""Training throughput of the product's own path (engine.training.loop: config -> data -> DeepSpeed).

A llama-7B-shaped model with random weights (from_scratch: nothing to download), generated
sample data through the real dataset/packing/answer-masked loss, the real metrics. Prints one
table: tokens/s/GPU (real, non-pad tokens), MFU, peak GPU memory per rank, step time.

    python bench/bench_train.py prepare --out runs/bench            # config dirs + data (once)
    torchrun --nproc_per_node 2 bench/bench_train.py run --out runs/bench --name pp2_s2048 \\
        --seq 2048 --set model_topo.process_topology.dims=[2,1] ...    # one case (all ranks)
    python bench/bench_train.py table --out runs/bench               # the summary table

Steps after the first `--warmup` are measured (compile and allocator warm-up excluded).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096,
                intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
SHAPES = {
    "7b": {},
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16),  # the FP8 quality gate's model
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),  # smoke test on CPU
}
WORDS = ("the model learns from data while pipeline stages pass activations forward and gradients back "
         "every token counts and packing keeps rows full so no compute is wasted on padding at all").split()


def prepare(out: Path, n_samples: int, shape: str, layers: int | None) -> None:
    from models.tiny import make_tiny_tokenizer

    hf = out / "llama7b"
    hf.mkdir(parents=True, exist_ok=True)
    cfg = {**LLAMA_7B, **SHAPES[shape]}
    if layers:
        cfg["num_hidden_layers"] = layers
    (hf / "config.json").write_text(json.dumps(cfg))
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(400)]
    make_tiny_tokenizer(hf, texts)
    with open(out / "data.jsonl", "w") as fh:  # instruct samples of mixed lengths: answer-masked loss
        for i in range(n_samples):
            n = int(rng.lognormvariate(6.5, 0.8))  # ~700 words median, long tail
            words = [rng.choice(WORDS) for _ in range(n)]
            cut = max(1, n // 4)
            fh.write(json.dumps({"type": "instruct", "instruct": " ".join(words[:cut]),
                                 "output": " ".join(words[cut:])}) + "\n")
    print(f"prepared {hf} and {n_samples} samples")


def run(out: Path, name: str, seq: int, overrides: list[str], zero: bool, unfused: bool = False) -> None:
    import torch

    if unfused:  # the 'before' of the fused-projection A/B (bench/unfused.py)
        from bench.unfused import patch
        patch()

    from engine.config import from_dict, apply_overrides
    from engine import distributed as D

    raw = {"model_path": str(out / "llama7b"), "data_path": [str(out / "data.jsonl")],
           "save_path": str(out / "runs" / name), "max_seq_len": seq, "n_epochs": 100, "max_steps": 8,
           "packing": True, "from_scratch": True, "compile_blocks": True, "seed": 1, "save_at_end": False,
           "cache_dir": str(out / "cache"),
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"},
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 32, "gradient_clipping": 1.0,
           "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}}}
    cfg = from_dict(apply_overrides(raw, overrides), f"bench:{name}")
    if zero:
        from engine.training.loop import train_zero as train_fn
    else:
        from engine.training.loop import train as train_fn
    train_fn(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    peaks = [None] * D.world_size()
    torch.distributed.all_gather_object(peaks, round(peak, 1))
    if D.rank() == 0:
        (Path(cfg.save_path) / "peak_gib.json").write_text(json.dumps(peaks))


def pp_rate(stage_rate: float, micro_batches: int = 16, stages: int = 2) -> float:
    """tok/s per GPU of a pp=`stages` run whose every stage runs at `stage_rate` (one stage's rate
    measured alone): the pipeline bubble leaves M/(M+P-1) of the time busy, and P GPUs share the tokens."""
    return stage_rate * micro_batches / (micro_batches + stages - 1) / stages


def table(out: Path, warmup: int, pp_micro: int = 16) -> None:
    """Product cases (runs/*/metrics.jsonl) and reference stages (ref/*.json, bench/ref_stage.py);
    a product case NAME is compared with the reference ref_NAME, else with the one named 'ref'."""
    rows = []
    for run_dir in sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []:
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [m for m in metrics if m["step"] > warmup] or metrics
        peak_file = run_dir / "peak_gib.json"
        peaks = json.loads(peak_file.read_text()) if peak_file.exists() else []
        rows.append((run_dir.name, statistics.median(m["tokens_per_s_per_gpu"] for m in timed),
                     statistics.median(m["mfu"] for m in timed), statistics.median(m["step_time_s"] for m in timed),
                     statistics.mean(m["loss"] for m in timed), peaks))
    refs = {f.stem: json.loads(f.read_text()) for f in sorted((out / "ref").glob("*.json"))} \
        if (out / "ref").is_dir() else {}
    print(f"{'case':34s} {'tok/s/GPU':>10s} {'MFU':>6s} {'step s':>7s} {'loss':>6s} {'vs ref':>7s} "
          f"{'pp2 est':>8s}  peak GiB per rank")
    for name, tps, mfu, dt, loss, peaks in rows:
        ref = refs.get(f"ref_{name}") or refs.get("ref")
        ratio = f"{tps / ref['tok_s']:7.3f}" if ref else f"{'':7s}"
        print(f"{name:34s} {tps:10.0f} {100 * mfu:5.1f}% {dt:7.2f} {loss:6.2f} {ratio} {pp_rate(tps, pp_micro):8.0f}  {peaks}")
    for name, r in refs.items():
        print(f"{name:34s} {r['tok_s']:10.0f} {'':6s} {r['step_s']:7.2f} {r['loss']:6.2f} {'(ref)':>7s} "
              f"{pp_rate(r['tok_s'], pp_micro):8.0f}  [{r['peak_gib']}]  micro {r['micro']} x {r['accum']}, "
              f"attn {r['attn']}, fp8 {r['fp8']}, accum {r['accum_dtype']}")
    print(f"pp2 est = stage tok/s x M/(M+P-1) / P with P=2, M={pp_micro} micro-batches: per-GPU rate of a pp=2 run "
          f"whose two stages each run at the measured rate")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["prepare", "run", "table"])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--name", default="case")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--layers", type=int, default=None, help="override the shape's block count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--zero", action="store_true", help="the ZeRO path (train_ds_zero.py's engine)")
    p.add_argument("--unfused", action="store_true", help="q/k/v and gate/up as separate GEMMs (bench/unfused.py)")
    p.add_argument("--pp-micro", type=int, default=16, help="micro-batches per step for the table's pp=2 estimate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    out = Path(a.out)
    if a.mode == "prepare":
        prepare(out, a.samples, a.shape, a.layers)
    elif a.mode == "run":
        run(out, a.name, a.seq, a.set, a.zero, a.unfused)
    else:
        table(out, a.warmup, a.pp_micro)
