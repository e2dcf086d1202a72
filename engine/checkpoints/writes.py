"""A checkpoint write that fails (disk full, quota, I/O error): one line on every rank, nothing published.

Every file of a tag is written by `integrity.save` (through `guarded`), some between collectives (ZeRO gathers the
next layer while this one is written). A rank that raised there would leave the collectives and
the other ranks would wait in them for ever; so inside `deferred()` the writer records the first
failure instead of raising and skips this rank's later writes, and `agree()`, a collective
before anything is published, raises SaveFailed on every rank if any rank failed (after the
caller's clean-up: the partial `.tmp-<tag>` is removed, `latest` and older tags are untouched).
"""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from engine import distributed as D
from engine import fault_hooks
from engine.checkpoints.files import LayoutError, current_tag, os_error_of


class SaveFailed(Exception):
    """A checkpoint could not be written (one line; the previous checkpoint is intact)."""

    every_rank = True  # raised by every rank together (engine/cli.py user_errors)


_error: list[str | None] = [None]  # the first failed write of the save in progress, on this rank
_deferring = [False]  # inside deferred()


def _mib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(path, e: OSError) -> str:
    what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e)).lower()
    try:
        free = f", {_mib(shutil.disk_usage(Path(path).parent).free)} free there"
    except OSError:
        free = ""
    return f"{path}: {what}{free}"


@contextmanager
def deferred():
    """While active, a failed checkpoint write (`guarded`) is recorded (first one) instead of
    raised; later writes of this rank are skipped. `agree()` reports it."""
    _error[0], _deferring[0] = None, True
    try:
        yield
    finally:
        _deferring[0] = False


def guarded(path, write, *args):
    """`write(*args)`, which writes the checkpoint file `path` and returns (size, hash). Inside
    `deferred()`, a failed write is recorded and returns (0, "") instead of raising."""
    if not _deferring[0]:
        return write(*args)
    if _error[0] is not None:
        return 0, ""  # this rank's save has failed already: the tag is discarded anyway
    try:
        fault_hooks.write_error(path)
        return write(*args)
    except (OSError, RuntimeError) as e:
        os_error = os_error_of(e)
        if os_error is None:  # not a failed write: a bug keeps its traceback
            raise
        _error[0] = describe(path, os_error)
        return 0, ""


@contextmanager
def recorded(where: Path):
    """A failed write inside the block (the publisher's steps) is recorded for `agree()`."""
    try:
        yield
    except OSError as e:
        if _error[0] is None:
            _error[0] = describe(e.filename or where, e)


def _latest(root: Path) -> str | None:
    """files.current_tag, for the paths that run after a write failed: a `latest` that cannot be
    read then must not replace the error being reported."""
    try:
        return current_tag(root)
    except (OSError, LayoutError):
        return None


def kept_note(root: Path, tag: str) -> str:
    """What a failed save of `tag` leaves, for the end of its error line."""
    latest = _latest(root)
    kept = f"the last checkpoint, {latest}, is intact" if latest else "there is no earlier checkpoint"
    return f" (saving {tag}; {kept}: free space and run the same command to resume)"


def discard(root: Path, tag: str) -> None:
    """(publisher) Remove what a failed save of `tag` left: its staging dir, the tag itself unless
    `latest` names it, a half-written `latest` replacement."""
    shutil.rmtree(root / f".tmp-{tag}", ignore_errors=True)
    if _latest(root) != tag:
        shutil.rmtree(root / tag, ignore_errors=True)
    for p in root.glob(".latest.tmp-*"):
        p.unlink(missing_ok=True)


def agree(on_failure=None, note: str = "") -> None:
    """Collective: if a write failed on any rank, every rank calls `on_failure()` and raises
    SaveFailed with the message of the lowest such rank (+ `note`)."""
    import torch.distributed as tdist

    error = _error[0]
    if D.world_size() > 1 and tdist.is_initialized():
        failed = D.comm_tensor([int(error is not None)])
        tdist.all_reduce(failed, op=tdist.ReduceOp.MAX)
        if failed.item():
            errors = [None] * D.world_size()
            tdist.all_gather_object(errors, error)
            error = next(e for e in errors if e is not None)
    if error is not None:
        _error[0] = None
        if on_failure is not None:
            on_failure()
        raise SaveFailed(error + note)


def tag_bytes(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def warn_if_short(save_path: str | Path, expected: int, basis: str, log) -> None:
    """One line when save_path's filesystem has less free space than the next tag needs."""
    try:
        free = shutil.disk_usage(save_path).free
    except OSError:
        return
    if free < expected:
        log(f"warning: {save_path}: {_mib(free)} free, the next checkpoint needs about {_mib(expected)} "
            f"({basis}); it will likely fail")
