"""One global step under torch.profiler (config key `profile_step`).

Writes, per rank, into <save_path>/profile/:
  rank<R>_step<N>_top.txt   kernels and ops sorted by device (else CPU) self time, with each one's
                            share of the step, plus the step's wall time and peak memory
  rank<R>_step<N>.json.gz   the Chrome/Perfetto trace (open in ui.perfetto.dev)
"""
from __future__ import annotations

import contextlib
import gzip
import shutil
import time
from pathlib import Path

import torch


@contextlib.contextmanager
def profiled_step(save_path: str, step: int, rank: int, rows: int = 40):
    """Profile the code inside the block as global step `step` of rank `rank`."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    out = Path(save_path) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
        if on_gpu:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    stem = out / f"rank{rank}_step{step}"
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = prof.key_averages()
    busy_us = sum(getattr(e, key) for e in events)
    lines = [f"step {step} rank {rank}: wall {wall:.3f} s (under the profiler); "
             f"busy {busy_us / 1e6:.3f} s ({100 * busy_us / 1e6 / wall:.1f}% of wall)"]
    if on_gpu:
        lines.append(f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    lines.append(f"{'self s':>8s} {'share':>6s} {'calls':>7s}  name")
    for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]:
        t = getattr(e, key)
        lines.append(f"{t / 1e6:8.3f} {100 * t / max(busy_us, 1):5.1f}% {e.count:7d}  {e.key[:140]}")
    (stem.with_name(stem.name + "_top.txt")).write_text("\n".join(lines) + "\n")
    trace = stem.with_suffix(".json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
