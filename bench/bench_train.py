"""Training throughput of the product's own path (engine.training.loop: config -> data -> DeepSpeed).

A model of a real family's shape with random weights (from_scratch: nothing to download; llama-7B
by default, `--family` for the others: FAMILY_SHAPES), generated sample data through the real
dataset/packing/answer-masked loss, the real metrics. Prints one table: tokens/s/GPU (real, non-pad
tokens), MFU (6 * N_active + attention: MoE counts top_k of its experts), peak GPU memory per rank,
step time, and each case's MFU / the llama case's MFU when one ran.

    python bench/bench_train.py prepare --out runs/bench [--family bloom-7b1] [--long-samples 48]  # config dirs + data (once)
    torchrun --nproc_per_node 2 bench/bench_train.py run --out runs/bench --name pp2_s2048 \\
        --seq 2048 --set model_topo.process_topology.dims=[2,1] ...    # one case (all ranks)
    python bench/bench_train.py table --out runs/bench               # the summary table

Steps after the first `--warmup` are measured (compile and allocator warm-up excluded). Each case
also records the dry run's peak estimate for its config (engine/plan.py), printed beside the measured
peak. Long context (bench/steps_long.txt): `prepare --long-samples N` writes <out>/long.jsonl, N
pretrain documents of ~16k words (lognormal, 2k-120k), which `run --set data_path=[<out>/long.jsonl]`
packs into 32k-128k rows; the levers are config keys (`--set offload_activations=true`,
`--set head_chunk_tokens=8192`).
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
    # QLoRA on one card (bench/steps_qlora.txt): Llama-2-70B's and CodeLlama-34B's published sizes
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
    "34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),  # smoke test on CPU
}
# Per family: a real hub config.json's fields (sizes as published; the tokenizer of a bench dir is
# tiny, the model's vocab is the config's) and the default block count of one stage-sized slice
# (embedding + blocks + head) that trains on one H200 (141 GB) at seq 2048, micro 4, bf16 with fp32
# masters (~18-20 bytes per trained parameter): ~3.4-3.5B parameters like llama-7B's 16 blocks.
FAMILY_SHAPES = {
    # 16 x 202M blocks + 2 x 131M embedding/head = 3.50B
    "llama-7b": (LLAMA_7B, 16),
    # bigscience/bloom-7b1: ALiBi, tied 250880 x 4096 embedding (1.03B) + 12 x 201M blocks = 3.44B
    "bloom-7b1": (dict(model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=250880, hidden_size=4096,
                       n_layer=30, n_head=32, layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True), 12),
    # baichuan-inc/Baichuan2-7B-Base: rotary, W_pack, NormHead; 2 x 515M + 12 x 202M = 3.46B
    "baichuan2-7b": (dict(model_type="baichuan", architectures=["BaichuanForCausalLM"], vocab_size=125696,
                          hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          max_position_embeddings=4096, model_max_length=4096, rms_norm_eps=1e-6, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, z_loss_weight=0,
                          position_embedding="rope"), 12),
    # baichuan-inc/Baichuan2-13B-Base: ALiBi; 2 x 644M + 7 x 315M = 3.49B
    "baichuan2-13b": (dict(model_type="baichuan", architectures=["BaichuanForCausalLM"], vocab_size=125696,
                           hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                           model_max_length=4096, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           tie_word_embeddings=False, z_loss_weight=0, position_embedding="alibi"), 7),
    # THUDM/chatglm3-6b: 2 kv groups, qkv bias, partial rotary; 2 x 266M + 14 x 204M = 3.39B
    "chatglm3-6b": (dict(model_type="chatglm", architectures=["ChatGLMModel"], padded_vocab_size=65024,
                         hidden_size=4096, ffn_hidden_size=13696, kv_channels=128, num_layers=28, num_attention_heads=32,
                         multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True, add_bias_linear=False,
                         layernorm_epsilon=1e-5, rmsnorm=True, post_layer_norm=True,
                         apply_residual_connection_post_layernorm=False, original_rope=True, rope_ratio=1,
                         seq_length=8192, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0), 14),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts top 2; a block is 1.45B (1.41B of experts): 3 blocks +
    # 2 x 131M = 4.6B trained (~90 GB of weights/grads/Adam) + activations; try --layers 4 (6.1B) if it fits
    "mixtral-8x7b": (dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000,
                          hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          router_aux_loss_coef=0.02, max_position_embeddings=32768, rms_norm_eps=1e-5,
                          rope_theta=1e6, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          tie_word_embeddings=False), 3),
}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # the block count's name per family


def family_config(family: str, shape: str | None = None, layers: int | None = None) -> dict:
    """config.json of a bench model: FAMILY_SHAPES[family] with `layers` blocks (default: the
    family's stage-sized count). llama-7b with a `--shape` preset (7b/13b/1b/tiny): the preset,
    whole (7b: all 32 blocks, what the pp=2 recipes and run_gpu.sh prepare) unless `layers`."""
    base, default_layers = FAMILY_SHAPES[family]
    cfg = {**base, **SHAPES[shape]} if family == "llama-7b" and shape else dict(base)
    if family == "llama-7b" and shape:
        default_layers = cfg["num_hidden_layers"]
    key = next(k for k in LAYER_KEYS if k in cfg)
    cfg[key] = layers or default_layers
    return cfg


def model_dir(out: Path, family: str) -> Path:
    """The bench model dir of a family (llama keeps its old name, run_gpu.sh checks for it)."""
    return out / ("llama7b" if family == "llama-7b" else family)


WORDS = ("the model learns from data while pipeline stages pass activations forward and gradients back "
         "every token counts and packing keeps rows full so no compute is wasted on padding at all").split()


def prepare(out: Path, n_samples: int, shape: str | None, layers: int | None, family: str = "llama-7b",
            long_samples: int = 0) -> None:
    import shutil

    from models import family_for_hf_config
    from models.tiny import make_tiny_tokenizer

    hf = model_dir(out, family)
    hf.mkdir(parents=True, exist_ok=True)
    cfg = family_config(family, shape, layers)
    fam = family_for_hf_config(cfg)
    if hasattr(fam, "REMOTE_CODE_DIR"):  # as a hub dir of the family: our remote code + its auto_map
        for f in Path(fam.REMOTE_CODE_DIR).glob("*.py"):
            shutil.copy2(f, hf / f.name)
        cfg = fam.export_hf_config(cfg)
    (hf / "config.json").write_text(json.dumps(cfg))
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(400)]
    make_tiny_tokenizer(hf, texts)
    if long_samples:
        write_long_documents(out / "long.jsonl", long_samples, rng)
    if (out / "data.jsonl").is_file() and n_samples <= sum(1 for _ in open(out / "data.jsonl")):
        print(f"prepared {hf} (data.jsonl kept)")
        return
    with open(out / "data.jsonl", "w") as fh:  # instruct samples of mixed lengths: answer-masked loss
        for i in range(n_samples):
            n = int(rng.lognormvariate(6.5, 0.8))  # ~700 words median, long tail
            words = [rng.choice(WORDS) for _ in range(n)]
            cut = max(1, n // 4)
            fh.write(json.dumps({"type": "instruct", "instruct": " ".join(words[:cut]),
                                 "output": " ".join(words[cut:])}) + "\n")
    print(f"prepared {hf} and {n_samples} samples")


def write_long_documents(path: Path, n: int, rng: random.Random) -> None:
    """n pretrain documents of ~16k words each (lognormal, clipped to 2k-120k): long-context rows hold
    a few whole documents, so attention spans thousands of keys, not a packed row of short samples."""
    with open(path, "w") as fh:
        for _ in range(n):
            words = min(max(int(rng.lognormvariate(9.6, 0.6)), 2000), 120_000)
            fh.write(json.dumps({"type": "pretrain", "text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    print(f"wrote {n} long documents to {path}")


def run(out: Path, name: str, seq: int, overrides: list[str], zero: bool, unfused: bool = False,
        family: str = "llama-7b") -> None:
    import torch

    if unfused:  # the 'before' of the fused-projection A/B (bench/unfused.py)
        from bench.unfused import patch
        patch()

    from engine import distributed as D

    cfg = case_config(out, name, seq, overrides, family)
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
        (Path(cfg.save_path) / "estimate_gib.json").write_text(json.dumps(dry_run_peaks(cfg, zero)))
        (Path(cfg.save_path) / "family.json").write_text(json.dumps({"family": family}))


def case_config(out: Path, name: str, seq: int, overrides: list[str], family: str = "llama-7b"):
    """The TrainConfig of one bench case: packed generated data, from scratch, compiled, bf16 +
    ZeRO-1, pp=2 unless `overrides` (`--set KEY=VALUE`) say otherwise."""
    from engine.config import from_dict, apply_overrides

    raw = {"model_path": str(model_dir(out, family)), "data_path": [str(out / "data.jsonl")],
           "save_path": str(out / "runs" / name), "max_seq_len": seq, "n_epochs": 100, "max_steps": 8,
           "packing": True, "from_scratch": True, "compile_blocks": True, "seed": 1, "save_at_end": False,
           "cache_dir": str(out / "cache"),
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"},
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 32, "gradient_clipping": 1.0,
           "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}}}
    return from_dict(apply_overrides(raw, overrides), f"bench:{name}")


def dry_run_peaks(cfg, zero: bool) -> list[float]:
    """The dry run's peak estimate (GiB) per pipeline stage (one entry per rank under ZeRO) for the case's
    config as it ran (validated, parts resolved from the same cost model)."""
    from engine import distributed as D
    from engine.model import Model
    from engine.plan import GiB, report

    model = Model.for_training(cfg)
    _, stages = report(cfg, model.family, model.args, D.world_size(), pipeline=not zero)
    return [round(s.peak / GiB, 1) for s in stages]


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
        est_file = run_dir / "estimate_gib.json"
        estimates = json.loads(est_file.read_text()) if est_file.exists() else []
        fam_file = run_dir / "family.json"
        family = json.loads(fam_file.read_text())["family"] if fam_file.exists() else "llama-7b"
        rows.append((run_dir.name, family, statistics.median(m["tokens_per_s_per_gpu"] for m in timed),
                     statistics.median(m["mfu"] for m in timed), statistics.median(m["step_time_s"] for m in timed),
                     statistics.mean(m["loss"] for m in timed), peaks, estimates))
    refs = {f.stem: json.loads(f.read_text()) for f in sorted((out / "ref").glob("*.json"))} \
        if (out / "ref").is_dir() else {}
    # MFU of every case against the llama case's of the same run (the issue's per-family target:
    # >= 0.95); the first llama case counts when several ran
    llama_mfu = next((mfu for _, fam, _, mfu, *_ in rows if fam == "llama-7b"), None)
    print(f"{'case':34s} {'family':14s} {'tok/s/GPU':>10s} {'MFU':>6s} {'/llama':>6s} {'step s':>7s} {'loss':>6s} "
          f"{'vs ref':>7s} {'pp2 est':>8s}  peak GiB per rank (dry-run estimate per stage)")
    for name, family, tps, mfu, dt, loss, peaks, estimates in rows:
        ref = refs.get(f"ref_{name}") or refs.get("ref")
        ratio = f"{tps / ref['tok_s']:7.3f}" if ref else f"{'':7s}"
        vs_llama = f"{mfu / llama_mfu:6.3f}" if llama_mfu else f"{'':6s}"
        print(f"{name:34s} {family:14s} {tps:10.0f} {100 * mfu:5.1f}% {vs_llama} {dt:7.2f} {loss:6.2f} {ratio} "
              f"{pp_rate(tps, pp_micro):8.0f}  {peaks} ({estimates or 'no estimate'})")
    ref_llama = next((r["mfu"] for r in refs.values() if r.get("family", "llama-7b") == "llama-7b" and "mfu" in r), None)
    for name, r in refs.items():
        mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else f"{'':6s}"
        vs_llama = f"{r['mfu'] / ref_llama:6.3f}" if ref_llama and "mfu" in r else f"{'':6s}"
        print(f"{name:34s} {r.get('family', 'llama-7b'):14s} {r['tok_s']:10.0f} {mfu} {vs_llama} {r['step_s']:7.2f} {r['loss']:6.2f} {'(ref)':>7s} "
              f"{pp_rate(r['tok_s'], pp_micro):8.0f}  [{r['peak_gib']}]  micro {r['micro']} x {r['accum']}, "
              f"attn {r['attn']}, fp8 {r['fp8']}{' +head' if r.get('fp8_head') else ''}, "
              f"kernels {r.get('kernels', 'inductor')}, accum {r['accum_dtype']}")
    print(f"pp2 est = stage tok/s x M/(M+P-1) / P with P=2, M={pp_micro} micro-batches: per-GPU rate of a pp=2 run "
          f"whose two stages each run at the measured rate")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["prepare", "run", "table"])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--name", default="case")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--long-samples", type=int, default=0,
                   help="prepare: also write <out>/long.jsonl, this many ~16k-word pretrain documents (long context)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="llama-7b presets, whole model unless --layers (run_gpu.sh passes 7b: all 32 blocks)")
    p.add_argument("--family", choices=list(FAMILY_SHAPES), default="llama-7b",
                   help="model shape per family (FAMILY_SHAPES); prepare writes <out>/<family>, run trains it")
    p.add_argument("--layers", type=int, default=None, help="override the shape's block count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--zero", action="store_true", help="the ZeRO path (train_ds_zero.py's engine)")
    p.add_argument("--unfused", action="store_true", help="q/k/v and gate/up as separate GEMMs (bench/unfused.py)")
    p.add_argument("--pp-micro", type=int, default=16, help="micro-batches per step for the table's pp=2 estimate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    out = Path(a.out)
    if a.mode == "prepare":
        prepare(out, a.samples, a.shape, a.layers, a.family, a.long_samples)
    elif a.mode == "run":
        run(out, a.name, a.seq, a.set, a.zero, a.unfused, a.family)
    else:
        table(out, a.warmup, a.pp_micro)
