"""Multi-GPU check of issue 30's failure handling on NCCL (2 GPUs; on CPU it runs the same on gloo).

1. stall: rank 1 waits in a receive nobody sends (PPLLM_TEST_STALL_AFTER_STEP=2:1), dist_timeout_s
   30: does the run end, with what exit status, after how long, with which error lines, and are
   all ranks gone?
2. orphan: the same stall with dist_timeout_s 1800, then launch.py (the ranks' parent) SIGKILLed:
   are the ranks gone ~30 s later (watch_launcher's grace)?
Prints one RESULT line per case; a tiny random llama (models/tiny), fp32, pp=2.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

DATA = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "examples" / "data").glob("*.json*"))


def setup(work: Path):
    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model, sample_texts

    make_tiny_hf_model(work / "hf", "llama", sample_texts(DATA))
    return hf_to_pp(work / "hf", work / "pp")


def write(pp, work: Path, name: str, **over) -> tuple[Path, Path]:
    """tests/test_train.py's config (that module needs pytest): pp=2, fp32, 4 steps."""
    raw = {"model_path": str(pp), "data_path": DATA, "save_path": str(work / name), "max_seq_len": 64,
           "n_epochs": 50, "max_steps": 4, "packing": True, "seed": 7, "save_every_steps": 0, "save_at_end": False,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}, **over}
    (work / f"{name}.yml").write_text(yaml.safe_dump(raw))
    return work / f"{name}.yml", work / name


def report(case, rc, t0, log: Path, gone: bool) -> None:
    text = log.read_text(errors="replace")
    lines = re.findall(r"(?:^|[\r\]])(error: [^\r\n]*)", text, re.M)
    nccl = [l for l in text.splitlines() if "Watchdog caught" in l or "timed out" in l.lower()][:3]
    print(f"RESULT {case}: rc={rc} seconds={time.monotonic() - t0:.0f} all_ranks_gone={gone} "
          f"error_lines={len(lines)} {lines[:2]} nccl_lines={nccl}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="stall,orphan")
    a = p.parse_args(argv)
    from tests.dist import Running, group_alive, launch, ranks_of, wait_for, wait_group

    work = Path(tempfile.mkdtemp(prefix="distcheck-"))
    pp = setup(work)
    if "stall" in a.cases:
        cfg, _ = write(pp, work, "stall", dist_timeout_s=30)
        t0 = time.monotonic()
        proc = launch(cfg, work / "stall.log", env={"PPLLM_TEST_STALL_AFTER_STEP": "2:1"})
        rc = wait_group(proc, timeout=300)
        report("stall", rc, t0, work / "stall.log", not group_alive(proc.pid))
    if "orphan" in a.cases:
        cfg, save = write(pp, work, "orphan")
        proc = launch(cfg, work / "orphan.log", env={"PPLLM_TEST_STALL_AFTER_STEP": "2:1"})
        wait_for(lambda: (save / ".stalled-2").exists(), proc, "rank 1 to stall", timeout=300)
        ranks = ranks_of(proc.pid)
        t0 = time.monotonic()
        os.kill(ranks[0].parent().pid, signal.SIGKILL)
        end = time.monotonic() + 120
        while any(Running.of(r).poll() is None for r in ranks) and time.monotonic() < end:
            time.sleep(0.5)
        gone = all(Running.of(r).poll() is not None for r in ranks)
        if not gone:
            os.killpg(proc.pid, signal.SIGKILL)
        report("orphan", proc.wait(), t0, work / "orphan.log", gone)


if __name__ == "__main__":
    main()
