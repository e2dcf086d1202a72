"""One training run per save_path: `<save_path>/.lock`.

Rank 0 holds an exclusive flock on the open file for as long as it trains (the kernel drops it
when the process ends, even by SIGKILL, so a crash never leaves a live-looking lock behind) and
writes who holds it: host, pid and that process's start time. The file decides where flock
cannot: flock may not reach across hosts (NFS mounted with `nolock` or `local_lock=flock`),
so a holder recorded on another host is respected (delete the file if that run is gone), and a
holder on this host whose process is gone (or whose pid now names another process: start
times differ) is taken over with a note. Released (file removed) when the run ends.

Every rank also looks before it joins the process group (`refuse_if_held_here`): a second
launch of a running job on the same machine must not reach the first one's rendezvous port.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from engine import distributed as D

LOCK = ".lock"


class LockHeld(Exception):
    """Another run uses this save_path, or its lock cannot be taken (one line, exit 2)."""

    every_rank = True  # raised by every rank together (engine/cli.py user_errors)


def _host() -> str:
    return socket.gethostname()


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class Holder:
    def __init__(self, host: str, pid: int, started: float):
        self.host, self.pid, self.started = host, pid, started

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]))
        except (ValueError, KeyError, TypeError):
            return None  # empty (released, or being written) or not ours

    @classmethod
    def me(cls) -> Holder:
        return cls(_host(), os.getpid(), _started(os.getpid()) or time.time())

    def dump(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started,
                           "since": self.since()}) + "\n"

    def here(self) -> bool:
        return self.host == _host()

    def alive(self) -> bool:
        """(this host only) The recorded process still runs: same pid, same start time."""
        started = _started(self.pid)
        return started is not None and abs(started - self.started) < 1.0

    def since(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.since()}"


def _read(path: Path) -> Holder | None:
    try:
        return Holder.parse(path.read_text())
    except OSError:
        return None


def refuse_if_held_here(save_path: str | Path) -> None:
    """Raise LockHeld when a live process on this host holds save_path's lock. Every rank calls
    this before joining the process group, when its own run cannot hold the lock yet."""
    path = Path(save_path) / LOCK
    holder = _read(path)
    if holder is not None and holder.here() and holder.alive():
        raise LockHeld(f"{path}: held by {holder}")


class RunLock:
    def __init__(self, path: Path, fd: int, made_dir: bool):
        self.path, self.fd, self.made_dir = path, fd, made_dir

    @classmethod
    def acquire(cls, save_path: str | Path, log=print) -> RunLock:
        """Take save_path's lock for this process (rank 0) or raise LockHeld naming the holder."""
        root = Path(save_path)
        made_dir = not root.exists()
        path = root / LOCK
        while True:
            try:
                root.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # read-only, no permission, full: nothing can be saved here either
                raise LockHeld(f"{path}: cannot create the run lock ({e.strerror.lower()})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read(path)
                if holder is None:
                    raise LockHeld(f"{path}: held by another process") from None
                if holder.here() and not holder.alive():  # its child (forked, not exec'd) keeps the flock
                    raise LockHeld(f"{path}: held by a process that {holder} started (it has ended; "
                                   f"`fuser -v {path}` shows what still holds the lock)") from None
                raise LockHeld(f"{path}: held by {holder}") from None
            except OSError as e:  # no flock on this filesystem: the info file alone decides
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed the file between our open and flock: retry
        lock = cls(path, fd, made_dir)
        try:
            holder = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
            if holder is not None:
                if not holder.here():
                    raise LockHeld(f"{path}: held by {holder} (another host, whose processes cannot be seen "
                                   f"from here; if that run has ended, delete {path})")
                if holder.alive() and holder.pid != os.getpid():  # flock did not see it: trust the file
                    raise LockHeld(f"{path}: held by {holder}")
                if holder.pid != os.getpid():
                    log(f"note: {path}: taking over the lock of {holder}, which is no longer running")
            os.ftruncate(fd, 0)
            os.pwrite(fd, Holder.me().dump().encode(), 0)
            os.fsync(fd)
        except BaseException:
            lock.release(remove=False)
            raise
        return lock

    def release(self, remove: bool = True) -> None:
        """Drop the lock; with `remove`, delete the file (and save_path, if this run made it and it
        is still empty)."""
        if self.fd is None:
            return
        try:
            if remove:
                try:
                    if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                        self.path.unlink()  # while still locked: nobody can take the old file meanwhile
                except FileNotFoundError:
                    pass
                if self.made_dir:
                    try:
                        self.path.parent.rmdir()
                    except OSError:  # not empty: the run wrote something
                        pass
        finally:
            os.close(self.fd)
            self.fd = None


def take(save_path: str | Path) -> RunLock | None:
    """Rank 0 takes save_path's lock; every rank raises the same LockHeld if it could not
    (collective). Returns the lock on rank 0, None elsewhere."""
    import torch.distributed as tdist

    lock, error = None, None
    if D.rank() == 0:
        try:
            lock = RunLock.acquire(save_path, log=lambda text: print(text, file=sys.stderr))
        except LockHeld as e:
            error = str(e)
    if D.world_size() > 1 and tdist.is_initialized():
        box = [error]
        tdist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise LockHeld(error)
    return lock
