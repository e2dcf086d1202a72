"""Process-group set-up shared by training, tests and tools."""
from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import torch

_started = False  # init_distributed ran in this process (leave() then skips interpreter teardown)
_topology = None  # (axes, dims) of the pipeline run, "data" for a data-parallel-only one: named in error lines
_timeout_s: float | None = None  # dist_timeout_s (configure), then what the process group was started with
DEFAULT_TIMEOUT_S = 1800.0  # NCCL's own default: a hang ends within half an hour, a slow collective is not one


def on_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed(timeout_s: float | None = None) -> None:
    """Initialise DeepSpeed's comm layer: NCCL on GPU, gloo on CPU.

    `timeout_s` (the dist_timeout_s key) bounds every collective and the rendezvous: gloo raises
    in the waiting rank (engine/cli.py turns that into one line); NCCL's watchdog aborts the
    process (TORCH_NCCL_ASYNC_ERROR_HANDLING, torch's default teardown, set explicitly so that an
    environment left at 0 cannot make a stuck collective wait forever).

    On CPU DeepSpeed would JIT-compile its shared-memory all-reduce op (~1 min per cold
    start); gloo is what we test with, so mark that op unavailable before DeepSpeed probes it.
    """
    import deepspeed
    import deepspeed.comm as dist

    global _started, _timeout_s
    _started = True
    if dist.is_initialized():
        return
    _timeout_s = float(timeout_s or _timeout_s or DEFAULT_TIMEOUT_S)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if not on_gpu():
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    # The groups DeepSpeed makes later (pipeline neighbours, tied weights, data parallel) get
    # torch's module default (30 min), not the world group's timeout: new_group has no way to
    # inherit it, and DeepSpeed passes none. So the default itself is set.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=_timeout_s)
    if on_gpu() and os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0") == "0":
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"  # torch's default: tear the process down on a timeout
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=_timeout_s))
    if on_gpu():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def comm_tensor(values) -> torch.Tensor:
    """A small tensor on the device the process group communicates from (NCCL: this GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu() else None
    return torch.tensor(values, device=device)


def rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def leave(code) -> None:
    """End a script's process with `code` (SystemExit's meaning). After a distributed run, once
    stdio is flushed and atexit handlers have run, skip interpreter teardown (os._exit): gloo's
    worker threads still free finished collectives' tensors, which takes the GIL, and one caught
    by finalization aborts the process ("terminate called without an active exception",
    pytorch#190489): a run that had finished and saved exited with SIGABRT about 1 time in 15
    on 2 CPU ranks. destroy_process_group does not join those threads (the groups live on in
    DeepSpeed's engine), so there is no earlier point at which they are known to be idle."""
    if not _started:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # logging, monitors (wandb, tensorboard), weakref finalizers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


# ---------------------------------------------------------------------- where a rank is, what it waited in
def configure(timeout_s: float, topology=None) -> None:
    """Before the run starts (engine/cli.py): the dist_timeout_s that init_distributed applies, and
    the run's layout for naming a rank's place in error lines: `topology` is the pipeline's
    model_topo.process_topology (axes, dims), None for a data-parallel-only run (ZeRO)."""
    global _timeout_s, _topology
    _timeout_s, _topology = float(timeout_s), ((list(topology.axes), list(topology.dims)) if topology else "data")


def _own_rank() -> int:
    """rank(), also before the process group is up (a rendezvous that timed out): the launcher's RANK."""
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", "0"))


def position() -> str:
    """This rank's place: "pipeline stage 1, data rank 0", "data rank 3", or "" if not known."""
    if _topology == "data":
        return f"data rank {_own_rank()}"
    if _topology is None:
        return ""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    axes, dims = _topology
    coord = ProcessTopology(axes=axes, dims=dims).get_coord(_own_rank())
    return f"pipeline stage {coord.pipe}, data rank {coord.data}"


_COMM_FILES = (os.sep.join(("torch", "distributed", "")), os.sep.join(("deepspeed", "comm", "")))


def collective_timeout(exc: BaseException) -> str | None:
    """One line for a collective (or the rendezvous) that waited past dist_timeout_s, naming the
    rank, its stage and the operation; None for any other exception. gloo raises these in the
    waiting rank ("Timed out waiting 5000ms for recv operation"); c10d's store and NCCL's blocking
    wait say "timed out"/"Timeout"."""
    if not isinstance(exc, RuntimeError) or "timed out" not in str(exc).lower():
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    comm = [i for i, f in enumerate(frames) if any(part in f.filename for part in _COMM_FILES)]
    if not comm:
        return None
    op = frames[comm[-1]].name  # the innermost torch/DeepSpeed comm function: all_reduce, recv, barrier, ...
    caller = next((f for f in reversed(frames[:comm[0]])), None)
    where = f" in {_short(caller.filename)}:{caller.name}" if caller is not None else ""
    limit = f"{_timeout_s:g} s" if _timeout_s else "its limit"
    where_in_run = position()
    who = f"rank {_own_rank()}" + (f" ({where_in_run})" if where_in_run else "")
    return (f"error: {who}: {op}{where} waited longer than dist_timeout_s ({limit}): another rank never joined "
            f"it (stuck, dead, or in a different collective); every rank stops")


def _short(filename: str) -> str:
    """A frame's file as a reader finds it: from the package root (deepspeed/..., engine/...)."""
    path = Path(filename)
    for i in range(len(path.parts) - 1, -1, -1):
        if path.parts[i] in ("site-packages", "dist-packages"):
            return "/".join(path.parts[i + 1:])
    try:
        return str(path.relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return path.name


# ---------------------------------------------------------------------- one error line per run
def report_once(line: str) -> bool:
    """Print `line` (an `error:` line) unless another rank of this run prints the run's line; True
    if printed here. Ranks fail at different moments and the launcher kills the others as soon as
    one exits, so "rank 0 prints" lost the line whenever another rank failed first. Instead the
    first rank to fail claims the line: it links a file holding its pid to `claim` in a directory
    named after this run (the ranks' common parent, the launcher: its pid and start time, and the
    rendezvous port); link() fails if the name exists, so exactly one rank wins. The winner prints,
    then creates `printed`. A loser waits for `printed` before it exits (its exit would make the
    launcher kill the winner between claim and print); if the winner dies without printing, a
    loser takes over (`takeover`, claimed the same way). A multi-node run prints one line per node."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _print(line)
    run = _run_dir()
    for name in ("claim", "takeover"):
        if _link_pid(run / name):
            # on a line of its own: rank 0's progress bar may hold the current one (no newline yet)
            fresh = "" if os.environ.get("RANK", "0") == "0" else "\r\x1b[K" if sys.stderr.isatty() else "\n"
            printed = _print(fresh + line)
            (run / "printed").touch()  # also when stderr is gone: nobody else can print either
            return printed
        if _await_printed(run, run / name):
            return False
    return False


def reported() -> bool:
    """Another rank of this run has printed the run's error line."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (_run_dir() / "printed").exists()


REPORT_WAIT_S = 60.0  # a loser's wait for a live winner to print (microseconds, unless stderr blocks)


def _print(line: str) -> bool:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # the terminal is gone with the launcher
        return False
    return True


def _run_dir() -> Path:
    import psutil

    parent = psutil.Process().parent()
    started = int(parent.create_time() * 100) if parent is not None else 0
    run = Path(tempfile.gettempdir()) / f"ppllm-{os.getuid()}" / f"{os.getppid()}-{started}-{os.environ.get('MASTER_PORT', '')}"
    if not run.is_dir():
        _remove_stale(run.parent)
        run.mkdir(parents=True, exist_ok=True)
    return run


def _link_pid(path: Path) -> bool:
    """Create `path` holding this pid, atomically (content and existence at once); False if it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _await_printed(run: Path, holder: Path) -> bool:
    """True once the line is printed (or the live holder took past REPORT_WAIT_S); False if the
    holder died without printing."""
    import time

    import psutil

    pid, end = int(holder.read_text()), time.monotonic() + REPORT_WAIT_S
    while not (run / "printed").exists():
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            return (run / "printed").exists()
        if time.monotonic() > end:
            return True
        time.sleep(0.01)
    return True


def _remove_stale(root: Path) -> None:
    """Claim dirs of runs whose launcher is gone (they are a few bytes, but should not pile up)."""
    import psutil

    for run in root.glob("*-*-*") if root.is_dir() else ():
        pid, started = run.name.split("-")[:2]
        try:
            alive = int(psutil.Process(int(pid)).create_time() * 100) == int(started)
        except (psutil.Error, ValueError):
            alive = False
        if not alive:
            for f in run.glob("*"):
                f.unlink(missing_ok=True)
            try:
                run.rmdir()
            except OSError:  # another rank is cleaning it too, or claiming in it
                pass


# ---------------------------------------------------------------------- the launcher's lifetime bounds ours
ORPHAN_GRACE_S = 30.0  # what DeepSpeed's launch.py gives its ranks between SIGTERM and SIGKILL
_watching = False


def _is_deepspeed_launcher(proc) -> bool:
    """DeepSpeed's runner (`deepspeed ...`, `python -m deepspeed.launcher.runner`) or its per-node
    launch.py (`python -u -m deepspeed.launcher.launch ...`)."""
    import psutil

    try:
        args = proc.cmdline()[:4]
    except psutil.Error:
        return False
    return any(os.path.basename(a) == "deepspeed" or a.startswith("deepspeed.launcher") for a in args)


def watch_launcher(poll_s: float = 1.0):
    """SIGTERM this process (save after the current step, then exit; at once before training
    started) when a DeepSpeed launcher process above it ends (launch.py, its parent, or the
    `deepspeed` runner above that). If the one that ended is our own parent (launch.py, e.g. after
    `kill -9`), nobody is left to end a rank that cannot stop (stuck in a collective, say): as
    launch.py would have, it is SIGKILLed ORPHAN_GRACE_S later. Started once per process, as the
    script starts (engine/cli.py run_script); returns a function that stops watching (a no-op for
    calls after the first). Any other parent (a shell, a scheduler, torch.multiprocessing) is not
    watched: `nohup python train_ds.py &` must outlive its shell.

    Polled by a daemon thread (psutil's is_running also catches a reused pid). Not the kernel's
    PR_SET_PDEATHSIG: that fires when the parent *thread* that started us ends, which a launcher
    running Popen from a short-lived thread would turn into a spurious stop."""
    import psutil

    global _watching
    if _watching:
        return lambda: None
    watched = []
    for proc in psutil.Process().parents():  # nearest first, up to the first that is not DeepSpeed's
        if not _is_deepspeed_launcher(proc):
            break
        watched.append(proc)
    if not watched:
        return lambda: None
    _watching = True
    done = threading.Event()

    def watch():
        signalled = False
        while not done.wait(poll_s):
            gone = next((p for p in watched if not p.is_running()), None)
            if gone is None:
                continue
            if not signalled:
                signalled = True
                try:
                    if os.environ.get("RANK", "0") == "0":
                        print(f"note: the launcher (pid {gone.pid}) has ended: stopping after this step",
                              file=sys.stderr, flush=True)
                except OSError:  # its terminal may be gone with it
                    pass
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)
            if not watched[0].is_running():  # orphaned: no launcher will SIGKILL us, so do it ourselves
                threading.Event().wait(ORPHAN_GRACE_S)
                os.kill(os.getpid(), signal.SIGKILL)

    def stop():
        global _watching
        done.set()
        _watching = False

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()
    return stop


def enable_stack_dumps() -> None:
    """`kill -USR2 <pid>` prints every thread's Python stack to stderr (faulthandler: works while
    the main thread is blocked inside a C++ collective): what a hung rank is waiting in."""
    import faulthandler

    if hasattr(signal, "SIGUSR2"):
        faulthandler.register(signal.SIGUSR2, all_threads=True)
