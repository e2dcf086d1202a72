"""Every multi-rank launch of the test suite, each under a watchdog.

`run_ranks(fn, 2, *args)` starts 2 fresh gloo processes (torch.multiprocessing), sets the usual
torch.distributed environment, calls `fn(*args)` in each and returns the results ordered by rank.
An exception on any rank fails the test with that rank's traceback.

`launch(cfg, log)` runs `deepspeed --num_gpus 2 train_ds.py --config cfg` (the real launcher and
CLI) in its own process group, output to `log`; `wait_group`/`wait_for` wait for it.

The watchdog: a launch that outlives its (generous) limit is a hang, not a slow run. Its ranks'
Python stacks (faulthandler, on SIGUSR2: engine/distributed.py enable_stack_dumps in the CLI, a
dump file per rank here) go into the failure, every process of it is killed, and the test fails
instead of stalling CI. The limits detect hangs; no test asserts on time.
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
# the `deepspeed` command; where pip put none beside the interpreter (`pip install --target`), its module
LAUNCHER = [DEEPSPEED] if os.path.exists(DEEPSPEED) else [sys.executable, "-m", "deepspeed.launcher.runner"]
HANG_S = 600  # a multi-rank test that runs this long is stuck: dump the stacks and fail
DUMP_HEADER = "most recent call first"  # faulthandler's line above each thread's stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- torch.multiprocessing ranks
def _worker(rank, world, port, fn, args, queue, dump_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import faulthandler

    dump = open(os.path.join(dump_dir, f"rank{rank}"), "w")  # kept open: faulthandler writes to its fd
    faulthandler.register(signal.SIGUSR2, file=dump, all_threads=True)
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


def run_ranks(fn, world: int, *args, timeout: float = HANG_S):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as dump_dir:
        procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, dump_dir)) for r in range(world)]
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
                        errors.append(f"hung: still running after {timeout:g} s; the ranks' stacks:\n"
                                      + _dump_ranks(procs, dump_dir))
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
                    p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def _dump_ranks(procs, dump_dir) -> str:
    alive = [(r, p) for r, p in enumerate(procs) if p.is_alive()]
    for _, p in alive:
        os.kill(p.pid, signal.SIGUSR2)
    files = [Path(dump_dir) / f"rank{r}" for r, _ in alive]
    _await(lambda: all(DUMP_HEADER in f.read_text() for f in files if f.exists()))
    return "\n".join(f"--- rank {r} (pid {p.pid}):\n{f.read_text() if f.exists() else '(no dump)'}"
                     for (r, p), f in zip(alive, files))


def _await(done, limit_s: float = 20) -> None:
    """Wait for a dump being written (the failure path only; a process that cannot write one is
    reported without it after limit_s)."""
    end = time.monotonic() + limit_s
    while not done() and time.monotonic() < end:
        time.sleep(0.05)


# ---------------------------------------------------------------------- the deepspeed launcher
_launched: dict[int, Path] = {}  # launcher pid -> its log, for the watchdog


def default_signals() -> None:
    """In the launched job: the stop signals as a terminal leaves them, not as whatever runs the
    tests does (`nohup` ignores SIGHUP, a background job's starter SIGINT; ignored ones survive exec
    and the run rightly keeps them ignored, so a test signalling it would wait in vain)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def launch(cfg: Path | None, log: Path, env=None, launcher_args=None, script: str = "train_ds.py",
           script_args=None):
    """`deepspeed <launcher_args> <script> --config cfg` (or `<script> <script_args...>`) in a new
    session (its pid is the group's), stdout and stderr appended to `log`."""
    args = launcher_args or ["--num_gpus", "2", "--master_port", str(free_port())]
    script_args = ["--config", str(cfg)] if script_args is None else [str(a) for a in script_args]
    proc = subprocess.Popen([*LAUNCHER, *args, str(script), *script_args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, preexec_fn=default_signals)
    _launched[proc.pid] = Path(log)
    return proc


def ranks_of(launcher_pid: int) -> list:
    """The rank processes (psutil) under a launcher: launch.py's children that got --local_rank."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if any(a.startswith("--local_rank") for a in child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def rank0_pid(launcher: subprocess.Popen, rank: int = 0) -> int:
    for child in ranks_of(launcher.pid):
        if f"--local_rank={rank}" in child.cmdline():
            return child.pid
    raise AssertionError(f"no rank {rank} under the launcher")


class Running:
    """A rank's process as wait_for watches a launcher: poll() is None while it runs."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.returncode = psutil.Process(pid), None

    @classmethod
    def of(cls, process):
        """From a psutil.Process (that may have ended since)."""
        self = cls.__new__(cls)
        self.process, self.returncode = process, None
        return self

    def poll(self):
        import psutil

        try:
            alive = self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        return None if alive else "gone"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def hang(what: str) -> AssertionError:
    """The watchdog's verdict: every live launch's rank stacks and log tail, then all of it killed."""
    parts = [what]
    for pid, log in list(_launched.items()):
        if not group_alive(pid):
            _launched.pop(pid)
            continue
        ranks = ranks_of(pid)
        before = log.read_text(errors="replace").count(DUMP_HEADER) if log.exists() else 0
        for r in ranks:
            try:
                os.kill(r.pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass
        _await(lambda: log.read_text(errors="replace").count(DUMP_HEADER) >= before + len(ranks))
        os.killpg(pid, signal.SIGKILL)
        _launched.pop(pid)
        parts.append(f"--- launch {pid} ({len(ranks)} ranks), the end of {log} with their stacks:\n"
                     + log.read_text(errors="replace")[-12000:])
    return AssertionError("\n".join(parts))


def wait_group(proc, timeout=HANG_S) -> int:
    """Wait for the launcher and everything it started (the whole process group) to be gone."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise hang(f"hung: the launch {proc.pid} still runs after {timeout} s") from None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not group_alive(proc.pid):
            _launched.pop(proc.pid, None)
            return rc
        time.sleep(0.1)
    raise hang("ranks outlived their launcher")


def wait_for(predicate, proc, what, timeout=HANG_S):
    """Wait until predicate() (an event the run reports: a file, a log line); `proc` (a launcher or
    Running) ending first fails."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise hang(f"hung: waited {timeout} s for {what}")
        time.sleep(0.02)


def kill9(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    wait_group(proc)
