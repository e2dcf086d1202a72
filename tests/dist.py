"""Run a function on N gloo ranks (CPU) and collect each rank's return value.

Every distributed test uses this one helper: `run_ranks(fn, 2, *args)` starts 2 fresh
processes, sets the usual torch.distributed environment, calls `fn(*args)` in each and returns
the results ordered by rank. An exception on any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()  # bytes, not tensors: shared-memory handles die with this process
        torch.save(fn(*args), buf)
        queue.put((rank, True, buf.getvalue()))
        queue.close()
        queue.join_thread()
        os._exit(0)  # skip interpreter/process-group teardown: seconds per rank, nothing to keep
    except BaseException:  # report, don't hang the other ranks' collect
        queue.put((rank, False, traceback.format_exc()))
        raise


def run_ranks(fn, world: int, *args, timeout: float = 600):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and not errors:
            try:
                rank, ok, value = queue.get(timeout=1)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s")
                continue
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
