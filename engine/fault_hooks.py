"""Test-only fault injection, driven by environment variables (unset in normal runs: no effect).

PPLLM_TEST_PAUSE_IN_SAVE=<step>:<seconds>  the checkpoint publisher, after DeepSpeed has written
    `.tmp-global_step<step>` and before anything is published, creates `<save_path>/.paused-<step>`
    and sleeps: a test can SIGKILL "while a checkpoint is being written" deterministically.
PPLLM_TEST_NAN_AT_STEP=<step>[,<step>...]  the loss of those global steps (1-based) is NaN, which
    makes every gradient NaN (exercises on_nonfinite_loss).
PPLLM_TEST_ENOSPC_IN_SAVE=<step>:<rank>  that rank's checkpoint writes of that step fail with ENOSPC.
PPLLM_TEST_HOLD_AFTER_STEP=<step>  after that step, before deciding whether to stop or save, rank 0
    creates `<save_path>/.held-<step>` and waits until the test deletes it (the other ranks wait
    in the next collective): the run is parked at a known step while a test acts on it. While
    parked, the stop signals rank 0 has taken in (RunControl's handler ran) are written to
    `<save_path>/.held-<step>.signals`, space-separated: a test signals, waits for the names to
    appear there, then lets the run go, so no signal can arrive after the stop was decided.
PPLLM_TEST_STALL_AFTER_STEP=<step>:<rank>  after that step (where the hold above happens), that
    rank creates `<save_path>/.stalled-<step>` and waits in a receive from the next rank, which never
    sends: one rank stuck in a collective its peers never join (they wait in the step's next one),
    as a mismatched collective leaves a run, until dist_timeout_s ends it.
PPLLM_TEST_HOLD_ANSWER=<n>  demo.py's generation, once text of its n-th new token or a later one has
    been written, prints `[held]` to stderr and waits, Python-level (a signal's handler runs), until
    interrupted: an answer a test Ctrl-Cs cannot end before the Ctrl-C arrives.
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path


def pause_in_save(root: Path, step: int) -> None:
    spec = os.environ.get("PPLLM_TEST_PAUSE_IN_SAVE")
    if not spec:
        return
    at, seconds = spec.split(":")
    if int(at) == step:
        (root / f".paused-{step}").write_text(str(os.getpid()))
        time.sleep(float(seconds))


def nan_steps() -> set[int]:
    spec = os.environ.get("PPLLM_TEST_NAN_AT_STEP", "")
    return {int(s) for s in spec.split(",") if s.strip()}


def wrap_loss(module, current_step) -> None:
    """Make module.loss_fn return NaN on the steps PPLLM_TEST_NAN_AT_STEP names; `current_step()`
    is the 1-based step being run."""
    steps = nan_steps()
    if not steps or module.loss_fn is None:
        return
    inner = module.loss_fn

    def loss_fn(outputs, labels):
        loss = inner(outputs, labels)
        return loss * float("nan") if current_step() in steps else loss

    for name in ("pop_metrics",):
        if hasattr(inner, name):
            setattr(loss_fn, name, getattr(inner, name))
    module.loss_fn = loss_fn


def write_error(path) -> None:
    """PPLLM_TEST_ENOSPC_IN_SAVE=<step>:<rank>: that rank's checkpoint file writes of that step's
    save fail with ENOSPC, as on a full disk."""
    spec = os.environ.get("PPLLM_TEST_ENOSPC_IN_SAVE")
    if not spec:
        return
    at, rank = spec.split(":")
    if os.environ.get("RANK", "0") == rank and f".tmp-global_step{at}" in Path(path).parts:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def hold_after_step(root, step: int, received=lambda: ()) -> None:
    """`received()`: the names of the stop signals taken in so far (reported while parked)."""
    stall_after_step(root, step)
    spec = os.environ.get("PPLLM_TEST_HOLD_AFTER_STEP")
    if not spec or int(spec) != step or os.environ.get("RANK", "0") != "0":
        return
    flag = Path(root) / f".held-{step}"
    report, reported = Path(root) / f".held-{step}.signals", None
    flag.write_text(str(os.getpid()))
    while flag.exists():
        names = " ".join(received())
        if names != reported:
            tmp = report.with_name(report.name + ".tmp")
            tmp.write_text(names)
            os.replace(tmp, report)  # the test never reads half a list
            reported = names
        time.sleep(0.05)


def stall_after_step(root, step: int) -> None:
    spec = os.environ.get("PPLLM_TEST_STALL_AFTER_STEP")
    if not spec or [int(v) for v in spec.split(":")] != [step, int(os.environ.get("RANK", "0"))]:
        return
    import torch
    import torch.distributed as dist

    (Path(root) / f".stalled-{step}").write_text(str(os.getpid()))
    dist.recv(torch.zeros(1), src=(dist.get_rank() + 1) % dist.get_world_size())


def hold_answer(n_tokens: int) -> None:
    spec = os.environ.get("PPLLM_TEST_HOLD_ANSWER")
    if not spec or n_tokens < int(spec):  # the first text written at or after that token
        return
    import sys

    print("[held]", file=sys.stderr, flush=True)
    while True:  # ended by the KeyboardInterrupt of the Ctrl-C the test sends
        time.sleep(0.05)
