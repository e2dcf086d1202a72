"""Run safety under the real `deepspeed` launcher (2 CPU ranks): one run per save_path (a second
launch, even on the same rendezvous port, is refused in one line without touching the first),
a stale lock is taken over, a disk that fills up during a save is one line on every rank with the
previous checkpoint intact, and SIGTERM to the launcher process alone makes the ranks save and
exit. Every interrupted run, resumed with the same command, reproduces the uninterrupted losses.
"""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from engine.checkpoints.lock import LOCK, LockHeld, RunLock, refuse_if_held_here
from tests.dist import free_port
from tests.test_kill_resume import (Running, launch, losses, rank0_pid, steps_logged, wait_for, wait_group,
                                   wait_signals, write_config)


def digest(root) -> dict[str, str]:
    """Every file's hash, TensorBoard's event files aside (its writer flushes on a timer)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def error_lines(log) -> list[str]:
    return [l for l in log.read_text().splitlines() if l.startswith("error:")]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def parked(tiny_pp, tmp_path_factory):
    """A run parked after step 3 (checkpoint 2 saved); meanwhile the same command is launched again
    (same port); then SIGTERM goes to the first run's `deepspeed` process only and the run is let go."""
    work = tmp_path_factory.mktemp("parked")
    save, log = work / "run", work / "log"
    cfg = write_config(tiny_pp, save)
    port = str(free_port())
    first = launch(cfg, log, env={"PPLLM_TEST_HOLD_AFTER_STEP": "3"},
                   launcher_args=["--num_gpus", "2", "--master_port", port])
    wait_for(lambda: (save / ".held-3").exists(), first, "step 3")
    holder = rank0_pid(first)
    before = digest(save)
    second = launch(cfg, work / "log2", launcher_args=["--num_gpus", "2", "--master_port", port])
    second_rc = wait_group(second)
    after = digest(save)

    os.kill(first.pid, signal.SIGTERM)  # `kill <pid>` of the deepspeed command: its ranks are not signalled
    wait_for(lambda: first.poll() is not None, Running(holder), "the deepspeed command to end")  # (watchdog)
    # the ranks' watcher (polls every second) notices and SIGTERMs its own rank; rank 0 reports it
    wait_signals(save, 3, {"SIGTERM"}, Running(holder))
    (save / ".held-3").unlink()  # let the parked step go on to its stop/save decision
    wait_group(first)
    return {"work": work, "save": save, "log": log, "cfg": cfg, "holder": holder, "before": before,
            "after": after, "second_rc": second_rc, "second_log": work / "log2"}


def test_second_run_on_the_same_save_path_is_refused_untouched(parked):
    assert parked["second_rc"] == 2
    errors = error_lines(parked["second_log"])
    assert len(errors) == 1, parked["second_log"].read_text()[-3000:]
    assert re.fullmatch(rf"error: {re.escape(str(parked['save'] / LOCK))}: held by pid {parked['holder']} on host "
                        rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d", errors[0]), errors
    assert "Traceback" not in parked["second_log"].read_text()
    assert parked["after"] == parked["before"]  # not one byte of the first run's files changed


def test_sigterm_to_the_launcher_alone_saves_and_exits(parked):
    save, text = parked["save"], parked["log"].read_text()
    assert re.search(r"note: the launcher \(pid \d+\) has ended", text)
    assert f"SIGTERM received: saved {save / 'global_step3'} at step 3" in text
    assert (save / "latest").read_text() == "global_step3" and steps_logged(save)[-1] == 3
    assert not (save / LOCK).exists()  # released on the way out


def test_stale_lock_is_taken_over_and_the_run_resumes_bitwise(parked, launcher_reference):
    save, log = parked["save"], parked["work"] / "log3"
    gone = dead_pid()  # a run on this host that was killed -9: its lock file stayed behind
    (save / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": gone, "started": time.time() - 60}))
    proc = launch(parked["cfg"], log)
    assert wait_group(proc) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"note: {save / LOCK}: taking over the lock of pid {gone} on host" in text
    assert "resumed at step 3" in text
    assert losses(save) == launcher_reference  # every step once, bitwise equal to the uninterrupted run
    assert not (save / LOCK).exists()


def test_disk_full_during_save_is_one_line_and_rerun_resumes_bitwise(tiny_pp, tmp_path, launcher_reference):
    """ENOSPC from rank 1's writer only (test hook): both ranks agree the save failed and exit."""
    save, log = tmp_path / "run", tmp_path / "log"
    cfg = write_config(tiny_pp, save)
    proc = launch(cfg, log, env={"PPLLM_TEST_ENOSPC_IN_SAVE": "4:1"})
    assert wait_group(proc) == 2
    text = log.read_text()
    errors = error_lines(log)
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert f"{save / '.tmp-global_step4'}/" in errors[0] and "no space left on device" in errors[0], errors
    assert "the last checkpoint, global_step2, is intact" in errors[0]
    assert (save / "latest").read_text() == "global_step2" and (save / "global_step2" / "meta.json").is_file()
    assert not list(save.glob(".tmp-*")) and not (save / "global_step4").exists() and not (save / LOCK).exists()
    proc = launch(cfg, log)
    assert wait_group(proc) == 0, log.read_text()[-3000:]
    assert losses(save) == launcher_reference


def test_disk_full_on_a_real_filesystem(tiny_pp, tmp_path):
    """A small tmpfs (needs root / CAP_SYS_ADMIN): shrunk while the run is parked after step 3,
    so checkpoint 4 cannot fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        msg = f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the ENOSPC hook test covers the protocol"
        print(msg)
        pytest.skip(msg)
    try:
        save, log = disk / "run", tmp_path / "log"
        proc = launch(write_config(tiny_pp, save), log, env={"PPLLM_TEST_HOLD_AFTER_STEP": "3"})
        wait_for(lambda: (save / ".held-3").exists(), proc, "step 3")
        tag = sum(p.stat().st_size for p in (save / "global_step2").rglob("*") if p.is_file())
        used = int(subprocess.run(["df", "--output=used", "-k", str(disk)], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
        subprocess.run(["mount", "-o", f"remount,size={used + tag // 2048}k", str(disk)], check=True)
        (save / ".held-3").unlink()
        assert wait_group(proc) == 2
        text = log.read_text()
        errors = error_lines(log)
        assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
        assert f"{save / '.tmp-global_step4'}/" in errors[0] and "no space left on device" in errors[0], errors
        assert re.search(rf"warning: {re.escape(str(save))}: .* free, the next checkpoint needs about .* "
                         r"\(the size of global_step2\)", text)
        assert (save / "latest").read_text() == "global_step2" and (save / "global_step2" / "meta.json").is_file()
        assert not list(save.glob(".tmp-*")) and not (save / "global_step4").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# ---- the lock's rules, in-process (no launcher)

def test_lock_rules(tmp_path):
    save = tmp_path / "run"
    notes = []
    lock = RunLock.acquire(save, log=notes.append)
    info = json.loads((save / LOCK).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and not notes
    lock.release()
    assert not save.exists()  # made by the lock and left empty: removed with it

    # a live holder (another process holding the flock): refused, also by the early check of every rank
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, socket, sys, time, psutil\n"
        f"p = {str(save / LOCK)!r}\n"
        "os.makedirs(os.path.dirname(p), exist_ok=True)\n"
        "fd = os.open(p, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),"
        " 'started': psutil.Process().create_time()}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for check in (lambda: RunLock.acquire(save), lambda: refuse_if_held_here(save)):
            with pytest.raises(LockHeld, match=rf"{re.escape(str(save / LOCK))}: held by pid {holder.pid} on host"):
                check()
    finally:
        holder.kill()
        holder.wait()
    # ... and once it is gone (SIGKILL: the file stays, the flock does not), taken over with a note
    lock = RunLock.acquire(save, log=notes.append)
    assert len(notes) == 1 and f"taking over the lock of pid {holder.pid}" in notes[0]
    lock.release()

    # flock not shared (e.g. NFS with local locks): the file alone still refuses a live holder here
    parent = psutil.Process(os.getppid())
    (save / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": parent.pid,
                                         "started": parent.create_time()}))
    with pytest.raises(LockHeld, match=f"held by pid {parent.pid}"):
        RunLock.acquire(save)
    # a holder on another host is respected: its processes cannot be seen from here
    (save / LOCK).write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "started": time.time()}))
    refuse_if_held_here(save)  # not this host's business before the process group exists
    with pytest.raises(LockHeld, match=rf"held by pid 4242 on host node-elsewhere .*if that run has ended, "
                                       rf"delete {re.escape(str(save / LOCK))}"):
        RunLock.acquire(save)
    assert json.loads((save / LOCK).read_text())["host"] == "node-elsewhere"  # refused: file untouched


def test_failed_publish_keeps_the_previous_tag(tmp_path):
    """A write that fails in the publisher's steps (after the rename, before `latest` moved):
    one line, and only what `latest` names is left (single process: agree needs no peers)."""
    import errno

    from engine.checkpoints import writes

    root = tmp_path / "run"
    for d in ("global_step2", ".tmp-global_step4", "global_step4"):
        (root / d).mkdir(parents=True)
        (root / d / "layer_00-model_states.pt").write_bytes(b"x")
    (root / "latest").write_text("global_step2")
    (root / ".latest.tmp-123").write_text("global_st")
    note = writes.kept_note(root, "global_step4")
    with writes.recorded(root / ".tmp-global_step4"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / ".latest.tmp-123"))
    with pytest.raises(writes.SaveFailed, match=rf"^{re.escape(str(root / '.latest.tmp-123'))}: no space left on "
                                                r"device, .* free there \(saving global_step4; the last checkpoint, "
                                                r"global_step2, is intact"):
        writes.agree(lambda: writes.discard(root, "global_step4"), note)
    assert sorted(p.name for p in root.iterdir()) == ["global_step2", "latest"]
    writes.agree()  # the failure was reported once: the next save starts clean


def test_hangup_and_slurm_warning_signal_save_and_exit(tiny_pp, tmp_path):
    """SIGHUP (the terminal went away) and SIGUSR1 (SLURM's `--signal=USR1@T` warning) used to end
    the ranks at once (their default action), losing every step since the last checkpoint. Sent to
    the ranks, not the launcher, two in quick succession on rank 0, while the run is parked after
    step 3: the ranks agree to stop, save step 3 and exit 0 (resuming from such a tag: the SIGTERM tests)."""
    save, log = tmp_path / "run", tmp_path / "log"
    cfg = write_config(tiny_pp, save)
    proc = launch(cfg, log, env={"PPLLM_TEST_HOLD_AFTER_STEP": "3"})
    wait_for(lambda: (save / ".held-3").exists(), proc, "step 3")
    os.kill(rank0_pid(proc, 0), signal.SIGHUP)
    wait_signals(save, 3, {"SIGHUP"}, proc)  # the first one in names the stop
    os.kill(rank0_pid(proc, 0), signal.SIGUSR1)
    os.kill(rank0_pid(proc, 1), signal.SIGUSR1)  # rank 1 waits in a collective: it takes it in later
    wait_signals(save, 3, {"SIGHUP", "SIGUSR1"}, proc)
    (save / ".held-3").unlink()
    assert wait_group(proc) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"SIGHUP received: saved {save / 'global_step3'} at step 3" in text and "Traceback" not in text, text[-3000:]
    assert (save / "latest").read_text() == "global_step3" and steps_logged(save)[-1] == 3
    assert (save / "global_step3" / "meta.json").is_file() and not list(save.glob(".tmp-*"))


def test_stop_signals_leave_ignored_ones_alone():
    """`nohup` ignores SIGHUP so the run outlives its terminal: RunControl must not take it back."""
    from engine.training.control import RunControl

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        control = RunControl(0, True)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while control.signal is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert control.signal == "SIGUSR1" and control.poll() == (True, False)
        control.restore()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
