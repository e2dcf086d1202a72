"""What may end or interrupt the loop between steps: signals, wall-clock saves, non-finite losses.

Every decision is taken collectively, so all ranks save (a collective) or stop at the same step:
one small all-reduce per step carries "a signal arrived here" (any rank) and "save now by wall
time" (decided on rank 0 only; other ranks' clocks do not vote).

A launcher that dies without passing a signal on (`kill <pid of deepspeed>`: DeepSpeed's runner
has no handler, its child launch.py lives on and the ranks would train unattended) is turned into
a SIGTERM by `watch_launcher` (engine/distributed.py, started as the script starts).
"""
from __future__ import annotations

import signal
import sys
import time

from engine import distributed as D
from engine.distributed import watch_launcher  # noqa: F401  (loop.py's; one watcher per process)


# Signals that stop the run after the current step, with a checkpoint: a scheduler's SIGTERM, Ctrl-C,
# the terminal going away (SIGHUP: without `nohup`, which ignores it and is left so), and SIGUSR1,
# which SLURM sends ahead of the end of a job's time when asked to (`#SBATCH --signal=USR1@120`).
# Their default action would end the process at once, losing the steps since the last checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class NonFiniteLoss(RuntimeError):
    """on_nonfinite_loss: stop — reported as one line; the update of that step was not applied."""


class RunControl:
    def __init__(self, save_every_minutes: float, is_rank0: bool):
        self.period = save_every_minutes * 60.0
        self.is_rank0 = is_rank0
        self.last_save = time.monotonic()
        self.signal: str | None = None
        self.received: list[str] = []  # every stop signal taken in, in order (tests read it)
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:  # `nohup` (SIGHUP), a background job (SIGINT): keep
                    continue
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. embedded use): no handlers
                pass

    def _handler(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT == signal.Signals[self.signal]:
            # Ctrl-C twice: stop now, without waiting for the step (the last checkpoint is kept; a
            # partial one is removed at the next start). Ended by SIGINT itself, as shells expect,
            # rather than by a KeyboardInterrupt traceback from every rank.
            self.restore()
            if self.is_rank0:
                try:
                    print("note: second SIGINT: stopping now, without a checkpoint of this step", file=sys.stderr,
                          flush=True)
                except OSError:
                    pass
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        # A repeated SIGTERM is not an escalation: the deepspeed launcher relays the one the job
        # got to every rank (and SIGKILLs them 30 s later), so ranks often see two at once.
        self.signal = self.signal or signal.Signals(signum).name
        self.received.append(signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """(stop, save_by_time), identical on every rank."""
        import torch.distributed as dist

        timed = self.is_rank0 and self.period > 0 and time.monotonic() - self.last_save >= self.period
        flags = D.comm_tensor([int(self.signal is not None), int(timed)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])
