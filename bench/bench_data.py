"""Data pipeline throughput: tokenize (into the cache) and pack a generated JSONL corpus.

    python bench/bench_data.py                      # 1M mixed samples, tiny test tokenizer
    python bench/bench_data.py --samples 100000 --tokenizer /path/to/hf/model --max-seq-len 2048

Prints samples/s for tokenization (JSON read + validation + templates + tokenizer + cache
write), for loading the cache and packing, rows/s for assembling rows (what the loader does
each step), and peak RSS after each phase.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import build_dataset  # noqa: E402

WORDS = ("the river light bread town map bee honey tea ship sea road garden book music school night rain tree "
         "small large old new quiet bright slowly often never always learn build carry find make grow read "
         "write walk open close keep bring leave start because before after while until about over under").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_sample(rng: random.Random) -> dict:
    kind = rng.choice(("pretrain", "instruct", "instruct", "conversation", "conver_has_api", "ref_qa"))
    if kind == "pretrain":
        return {"type": kind, "text": " ".join(sentence(rng, 5, 20) for _ in range(rng.randint(2, 12)))}
    if kind == "instruct":
        return {"type": kind, "instruct": sentence(rng, 4, 12), "input": sentence(rng, 0, 20),
                "output": sentence(rng, 3, 60)}
    rounds = []
    for _ in range(rng.randint(1, 4)):
        rounds += [["ask", sentence(rng, 3, 15)], ["ans", sentence(rng, 3, 40)]]
    if kind == "conversation":
        return {"type": kind, "rounds": rounds}
    if kind == "ref_qa":
        return {"type": kind, "reference": sentence(rng, 30, 120), "rounds": rounds}
    action = {"inner_thought": sentence(rng, 3, 10), "api_name": "search",
              "api_param": {"query": rng.choice(WORDS)}, "api_res": sentence(rng, 5, 30)}
    rounds[-1] = ["ans-api", {"actions": [action], "ans": sentence(rng, 3, 30)}]
    return {"type": kind, "api_desc": "search: " + sentence(rng, 5, 20), "rounds": rounds}


def write_corpus(path: str, n: int, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(make_sample(rng)) + "\n")


def peak_rss_mib() -> str:
    """Peak RSS of this process, and of the largest tokenizing worker (if any ran)."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return f"{mine:.0f} MiB" + (f" (largest worker {worker:.0f} MiB)" if worker else "")


def rss_split() -> str:
    """Current RSS split into anonymous memory (really ours) and mapped file pages (the cache's
    memmap: shared by all ranks of a node and reclaimable by the kernel)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return "n/a"
    mib = lambda key: int(fields[key].split()[0]) / 1024  # noqa: E731
    return f"anonymous {mib('RssAnon'):.0f} MiB + mapped file {mib('RssFile'):.0f} MiB"


def load_tokenizer(path: str | None, workdir: str):
    if path:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    from tests.tokenizer_util import make_tokenizer
    return make_tokenizer(os.path.join(workdir, "tokenizer"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000, help="generated samples")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the tiny test tokenizer)")
    p.add_argument("--workdir", default=None, help="where the corpus and cache go (default: a temp dir)")
    p.add_argument("--rows", type=int, default=20_000, help="rows to assemble for the row-rate figure")
    a = p.parse_args()

    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-data-")
    tokenizer = load_tokenizer(a.tokenizer, workdir)
    corpus = os.path.join(workdir, f"corpus-{a.samples}.jsonl")
    if not os.path.exists(corpus):
        t = time.perf_counter()
        write_corpus(corpus, a.samples)
        print(f"generated {a.samples} samples ({os.path.getsize(corpus) / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t:.1f}s")
    cache = os.path.join(workdir, "cache")
    base_rss = peak_rss_mib()

    t, cpu = time.perf_counter(), time.process_time()
    plain = build_dataset([corpus], tokenizer, a.max_seq_len, cache_dir=cache)
    tok_s, tok_cpu = time.perf_counter() - t, time.process_time() - cpu
    print(f"tokenize+cache: {a.samples / tok_s:,.0f} samples/s ({tok_s:.1f}s wall, main process CPU {tok_cpu:.1f}s, "
          f"{os.cpu_count()} CPUs), {plain.stats['tokens'] / tok_s:,.0f} tokens/s, peak RSS {peak_rss_mib()} "
          f"(before: {base_rss}); truncated {plain.stats['truncated']}, padding {plain.stats['padding']:.1%}")

    t = time.perf_counter()
    packed = build_dataset([corpus], tokenizer, a.max_seq_len, cache_dir=cache, packing=True)
    pack_s = time.perf_counter() - t
    print(f"load cache+pack: {packed.stats['docs'] / pack_s:,.0f} samples/s ({pack_s:.1f}s), {len(packed)} rows "
          f"(padding {packed.stats['padding']:.1%}), peak RSS {peak_rss_mib()}")

    rows = random.Random(0).sample(range(len(packed)), min(a.rows, len(packed)))
    t = time.perf_counter()
    for i in rows:
        packed[i]
    row_s = time.perf_counter() - t
    print(f"row assembly: {len(rows) / row_s:,.0f} rows/s of {a.max_seq_len} tokens, peak RSS {peak_rss_mib()}; "
          f"now {rss_split()}")
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(cache) for f in files)
    print(f"cache on disk: {on_disk / 2**20:.0f} MiB in {cache}")


if __name__ == "__main__":
    main()
