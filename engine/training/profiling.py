"""One global step under torch.profiler (config key `profile_step`).

Writes, per rank, into <save_path>/profile/:
  rank<R>_step<N>_top.txt   on GPU: the step's span, how much of it the GPU was busy, its idle
                            time by gap length (long gaps = the host held the GPU back), and the
                            kernels by total time; on CPU: the ops by self CPU time
  rank<R>_step<N>.json.gz   the Chrome/Perfetto trace (open in ui.perfetto.dev)
"""
from __future__ import annotations

import contextlib
import gzip
import json
from collections import Counter
from pathlib import Path

import torch

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


@contextlib.contextmanager
def profiled_step(save_path: str, step: int, rank: int, rows: int = 40):
    """Profile the code inside the block as global step `step` of rank `rank`."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    out = Path(save_path) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        yield
        if on_gpu:
            torch.cuda.synchronize()
    stem = out / f"rank{rank}_step{step}"
    trace = stem.with_suffix(".json")
    prof.export_chrome_trace(str(trace))
    text = trace.read_text()
    with gzip.open(str(trace) + ".gz", "wt") as fh:
        fh.write(text)
    trace.unlink()
    events = json.loads(text)["traceEvents"]
    head = f"step {step} rank {rank}"
    if on_gpu:
        lines = gpu_summary(events, rows)
        lines.insert(1, f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    else:
        lines = cpu_summary(prof.key_averages(), rows)
    (stem.with_name(stem.name + "_top.txt")).write_text("\n".join([f"{head}: {lines[0]}"] + lines[1:]) + "\n")


def gpu_summary(events: list, rows: int) -> list[str]:
    """Busy time = union of the GPU's kernel/copy intervals; idle = the gaps between them."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and "dur" in e), key=lambda e: e["ts"])
    if not gpu:
        return ["no GPU activity recorded"]
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    gaps, reach = [], start
    for e in gpu:
        if e["ts"] > reach:
            gaps.append(e["ts"] - reach)
        reach = max(reach, e["ts"] + e["dur"])
    span, idle = end - start, sum(gaps)
    buckets = [sum(g for g in gaps if lo <= g < hi) for lo, hi in ((0, 50), (50, 1000), (1000, float("inf")))]
    total, calls = Counter(), Counter()
    for e in gpu:
        total[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    lines = [f"GPU span {span / 1e6:.3f} s, busy {100 * (span - idle) / span:.1f}%, idle {idle / 1e3:.1f} ms "
             f"(gaps <50 us: {buckets[0] / 1e3:.1f} ms, 50 us-1 ms: {buckets[1] / 1e3:.1f} ms, "
             f">1 ms: {buckets[2] / 1e3:.1f} ms)",
             f"{'total s':>8s} {'share':>6s} {'calls':>7s}  kernel"]
    for name, t in total.most_common(rows):
        lines.append(f"{t / 1e6:8.3f} {100 * t / span:5.1f}% {calls[name]:7d}  {name[:140]}")
    return lines


def cpu_summary(averages, rows: int) -> list[str]:
    ops = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    busy = sum(e.self_cpu_time_total for e in ops)
    lines = [f"CPU self time {busy / 1e6:.3f} s", f"{'self s':>8s} {'share':>6s} {'calls':>7s}  op"]
    for e in ops[:rows]:
        lines.append(f"{e.self_cpu_time_total / 1e6:8.3f} {100 * e.self_cpu_time_total / max(busy, 1):5.1f}% "
                     f"{e.count:7d}  {e.key[:140]}")
    return lines
