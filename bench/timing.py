"""The benches' one wall-clock timer: warm up, then the median of `iters` runs, each fenced by `sync`
(torch.cuda.synchronize on a GPU), in milliseconds."""
from __future__ import annotations

import statistics
import time


def timed(fn, iters: int, warmup: int, sync) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
