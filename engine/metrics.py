"""What users watch while training: a progress bar and metrics.jsonl (rank 0 only)."""
from __future__ import annotations

import json
import time
from pathlib import Path

PEAK_FLOPS = 989e12  # H100/H200 dense bf16


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*h*s for attention scores."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after `last_step` (the step a run resumes from): steps run after the
    last checkpoint by a killed run are run again, and each step keeps exactly one record."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    if keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


class Metrics:
    """Append one JSON line per step to <save_path>/metrics.jsonl and drive a tqdm bar."""

    def __init__(self, save_path: str | Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(save_path) / "metrics.jsonl"
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, start_step)
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.t_last = time.perf_counter()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
