"""The real CLI under the DeepSpeed launcher (2 CPU ranks): kill -9 at any moment, including
while a checkpoint is being written, SIGTERM, and two "nodes" on loopback. Restarting the same
command must give exactly the uninterrupted run's loss sequence (bitwise), each step once in
metrics.jsonl, and never a damaged `latest`."""
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.dist import (DEEPSPEED, ROOT, Running, free_port, kill9, launch, rank0_pid, wait_for,  # noqa: F401
                        wait_group)  # (the helpers, here for the tests that import them from this module)
from tests.test_train import config

STEPS = 10


def write_config(tiny_pp, save, **over) -> Path:
    kw = {"save_every_steps": 2, "keep_last": 2, **over}
    raw = config(tiny_pp, save, steps=kw.pop("max_steps", STEPS), **kw)
    path = Path(str(save) + ".yml")
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_signals(save: Path, step: int, names: set[str], proc) -> None:
    """Wait until rank 0, parked after `step` (PPLLM_TEST_HOLD_AFTER_STEP), reports having taken
    in every signal of `names` (engine/fault_hooks.py): only then may the test let the run go."""
    report = save / f".held-{step}.signals"
    wait_for(lambda: report.exists() and names <= set(report.read_text().split()), proc, f"rank 0 to take in {names}")


def steps_logged(save: Path) -> list[int]:
    path = save / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return out


def losses(save: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture
def reference(launcher_reference):  # tests/conftest.py: one uninterrupted run, shared with test_run_faults.py
    return launcher_reference


def test_kill9_anywhere_then_same_command_resumes_bitwise(tiny_pp, tmp_path, reference):
    save, log = tmp_path / "run", tmp_path / "log"
    cfg = write_config(tiny_pp, save)
    # 1. killed while global_step4 is being written: DeepSpeed's files are in .tmp-global_step4,
    #    nothing is published yet (the test hook pauses the publisher there)
    proc = launch(cfg, log, env={"PPLLM_TEST_PAUSE_IN_SAVE": "4:120"})
    wait_for(lambda: (save / ".paused-4").exists(), proc, "the pause inside save(4)")
    kill9(proc)
    assert (save / ".tmp-global_step4").is_dir() and (save / "latest").read_text() == "global_step2"
    assert 4 in steps_logged(save)  # steps 3-4 ran and were logged; they will run again
    # 2. the same command: resumes from step 2 (mid-epoch: 3 steps per epoch), removes the partial
    #    tag; killed again at a random moment a few steps later
    rng = random.Random(os.getpid())
    target = rng.randint(5, 8)
    proc = launch(cfg, log)
    wait_for(lambda: max(steps_logged(save), default=0) >= target, proc, f"step {target}")
    time.sleep(rng.uniform(0, 0.3))
    kill9(proc)
    text = log.read_text()
    assert "removing partial checkpoint" in text and ".tmp-global_step4" in text and "resumed at step 2" in text
    assert "(3/epoch)" in text  # so step 2 is mid-epoch: the loader resumes inside an epoch
    latest = (save / "latest").read_text()
    assert (save / latest / "meta.json").is_file()  # `latest` always names a complete tag
    # 3. the same command again, to the end
    proc = launch(cfg, log)
    assert wait_group(proc) == 0, log.read_text()[-3000:]
    assert losses(save) == reference  # every step exactly once, bitwise equal
    assert (save / "latest").read_text() == f"global_step{STEPS}" and not list(save.glob(".tmp-*"))
    tags = sorted(p.name for p in save.glob("global_step*"))
    assert tags == ["global_step10", "global_step8"]  # keep_last: 2


def test_sigterm_saves_and_exits_then_resumes_bitwise(tiny_pp, tmp_path, reference):
    """SIGTERM to the whole job while it is parked after step 3: it cannot finish before the signal
    is in; then it saves step 3, exits, and the same command resumes bitwise."""
    save, log = tmp_path / "run", tmp_path / "log"
    cfg = write_config(tiny_pp, save, save_every_steps=0)
    proc = launch(cfg, log, env={"PPLLM_TEST_HOLD_AFTER_STEP": "3"})
    wait_for(lambda: (save / ".held-3").exists(), proc, "step 3")
    rank0 = Running(rank0_pid(proc))  # the launcher itself dies of the signal; rank 0 lives on to save
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler's preemption sends to the job
    wait_signals(save, 3, {"SIGTERM"}, rank0)
    (save / ".held-3").unlink()
    wait_group(proc)
    assert max(steps_logged(save)) == 3
    assert (save / "latest").read_text() == "global_step3"
    assert f"SIGTERM received: saved {save / 'global_step3'}" in log.read_text()
    proc = launch(cfg, log)
    assert wait_group(proc) == 0, log.read_text()[-3000:]
    assert losses(save) == reference


def test_two_nodes_on_loopback_train_checkpoint_and_resume(tiny_pp, tmp_path, reference):
    """Two launchers, one rank each (`--no_ssh --node_rank R`), pp=2 across the "nodes"; the run
    is stopped after step 4 and resumed on the same two nodes."""
    save = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")

    def both(steps):
        cfg = write_config(tiny_pp, save, max_steps=steps, save_every_steps=2)
        port = str(free_port())
        procs = [launch(cfg, tmp_path / f"log{r}", launcher_args=[
            "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r), "--master_addr", "127.0.0.1",
            "--master_port", port]) for r in (0, 1)]
        rcs = [wait_group(p) for p in procs]
        assert rcs == [0, 0], [(tmp_path / f"log{r}").read_text()[-2000:] for r in (0, 1)]

    both(4)
    assert (save / "latest").read_text() == "global_step4"
    both(STEPS)
    assert "resumed at step 4" in (tmp_path / "log0").read_text()
    assert losses(save) == reference
