"""What may end or interrupt the loop between steps: signals, wall-clock saves, non-finite losses.

Every decision is taken collectively, so all ranks save (a collective) or stop at the same step:
one small all-reduce per step carries "a signal arrived here" (any rank) and "save now by wall
time" (decided on rank 0 only; other ranks' clocks do not vote).
"""
from __future__ import annotations

import signal
import time

from engine import distributed as D


class NonFiniteLoss(RuntimeError):
    """on_nonfinite_loss: stop — reported as one line; the update of that step was not applied."""


class RunControl:
    def __init__(self, save_every_minutes: float, is_rank0: bool):
        self.period = save_every_minutes * 60.0
        self.is_rank0 = is_rank0
        self.last_save = time.monotonic()
        self.signal: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. embedded use): no handlers
                pass

    def _handler(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT == signal.Signals[self.signal]:
            self.restore()  # Ctrl-C twice: stop waiting for the step to end
            signal.raise_signal(signum)
            return
        # A repeated SIGTERM is not an escalation: the deepspeed launcher relays the one the job
        # got to every rank (and SIGKILLs them 30 s later), so ranks often see two at once.
        self.signal = self.signal or signal.Signals(signum).name

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
