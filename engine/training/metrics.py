"""What users watch while training (rank 0): a progress bar, metrics.jsonl, TensorBoard, a loss PNG.

<save_path>/metrics.jsonl   one JSON object per global step (fields: README "Metrics")
<save_path>/tensorboard/    the same numbers as TensorBoard scalars (train/*, eval/*), when the
                            `tensorboard` package is importable
<save_path>/loss.png        train loss (+ eval loss) and learning rate per step; redrawn after
                            each evaluation and at the end, or any time with
                            `python train_ds.py plot <save_path>` (plot_command)

Other ranks write nothing and stay quiet; PPLLM_VERBOSE=1 lets every rank print its messages
(prefixed with its rank) and keeps DeepSpeed's INFO logs. Otherwise DeepSpeed's logger is set
to WARNING (its warnings and errors still show) and the bare prints DeepSpeed makes while
building a PipelineModule ("SEED_LAYERS=...", "Using topology: ...") are swallowed by
`quiet_prints`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from engine.plan import PEAK_FLOPS  # noqa: F401 (loop.py and bench read it here)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TB_DIR = "tensorboard"


def flops_per_token(dims, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (N: the parameters a token runs through; an
    MoE token runs top_k experts) plus 12*L*h*s for attention scores. `dims`: models.Dims."""
    active = n_params - dims.n_layers * (dims.experts - dims.top_k) * dims.mlp_params
    return 6 * active + 12 * dims.n_layers * dims.hidden * seq_len


# ----------------------------------------------------------------------------- logging
def verbose() -> bool:
    return os.environ.get("PPLLM_VERBOSE", "0") not in ("", "0", "false", "False")


def setup_logging() -> None:
    """DeepSpeed's logger at WARNING (INFO chatter off, warnings kept) unless PPLLM_VERBOSE=1."""
    if verbose():
        return
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_prints():
    """Swallow bare print()s (DeepSpeed prints some INFO text without its logger) unless
    PPLLM_VERBOSE=1. Logging handlers keep the stream they were made with, so logged warnings
    and errors still show; stderr is untouched."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def max_memory_gib() -> float | None:
    """Peak GPU memory allocated by this process (GiB), or None on CPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


# ----------------------------------------------------------------------------- the logger
class Metrics:
    """Append one JSON line per step to <save_path>/metrics.jsonl, mirror it to TensorBoard and
    drive a tqdm bar (step, loss, lr, tok/s, ETA). Disabled (a no-op) on ranks other than 0.

    On resume at `start_step`, lines of later steps (logged after the checkpoint the run
    resumes from) are dropped, so steps in the file always increase.
    """

    def __init__(self, save_path: str | Path, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool = True, rank: int = 0):
        self.enabled, self.rank = enabled, rank
        self.dir = Path(save_path)
        self.path = self.dir / METRICS_FILE
        self.bar, self.tb, self.last_eval = None, None, None
        self.t_last = time.perf_counter()
        if not enabled:
            return
        from tqdm import tqdm

        self.dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.message("tensorboard is not installed: metrics go to metrics.jsonl only "
                             "(pip install tensorboard)")
            else:
                self.tb = SummaryWriter(str(self.dir / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record}
        record.setdefault("max_mem_gib", max_memory_gib())
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.tb.add_scalar(tag, value, step)
        post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                "tok/s": f"{record['tokens_per_s']:.0f}"}
        if record.get("eval_loss") is not None:
            self.last_eval = record["eval_loss"]
        if self.last_eval is not None:
            post["eval"] = f"{self.last_eval:.4f}"
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(post, refresh=True)
        if record.get("eval_loss") is not None:
            self._safe_plot()

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(text)
        elif verbose():
            print(f"[rank {self.rank}] {text}", file=sys.stderr)

    def _safe_plot(self) -> None:
        if not self.enabled or not self.path.is_file():
            return
        try:
            plot(self.dir)
        except Exception as e:  # a plot must never fail a run
            self.message(f"warning: could not draw {self.dir / PLOT_FILE}: {type(e).__name__}: {e}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self._safe_plot()
        if self.bar is not None:
            self.bar.close()


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


# ----------------------------------------------------------------------------- plot
def read_metrics(save_path: str | Path) -> list[dict]:
    path = Path(save_path)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is this a training save_path?)")
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # the line a running (or killed) trainer is writing
                break
            raise MetricsError(f"{path}: line {n}: not JSON ({e.msg})") from None
        if not isinstance(records[-1], dict):
            raise MetricsError(f"{path}: line {n}: not a JSON object")
    return records


class MetricsError(ValueError):
    """A metrics.jsonl that is not one JSON object per line."""


def plot(save_path: str | Path, out: str | Path | None = None) -> Path:
    """Draw train loss (+ lm loss, eval loss) and learning rate per step from metrics.jsonl."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(save_path)
    base = Path(save_path) if Path(save_path).is_dir() else Path(save_path).parent
    out = Path(out) if out else base / PLOT_FILE
    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})

    def series(key):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
               and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    ax.plot(*series("loss"), label="train loss", linewidth=1)
    if any("lm_loss" in r for r in records):
        ax.plot(*series("lm_loss"), label="train lm loss", linewidth=1, alpha=0.7)
    steps, ev = series("eval_loss")
    if steps:
        ax.plot(steps, ev, "o-", label="eval loss", markersize=4)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{base.name}: {len(records)} steps" + (f", eval loss {ev[-1]:.4f}" if ev else ""))
    ax_lr.plot(*series("lr"), color="tab:gray", linewidth=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


PLOT_COMMAND = "python train_ds.py plot"  # the stable spelling (train_ds_zero.py takes it too)


def plot_command(argv: list[str], prog: str = PLOT_COMMAND) -> int:
    """`python train_ds.py plot <save_path> [--out file.png]`: redraw the loss PNG from metrics.jsonl
    (any time: while a run trains, after it crashed). Bad input is one `error:` line, exit 2."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
            sys.exit(2)

    p = Parser(prog=prog, description="Redraw the loss curve PNG from <save_path>/metrics.jsonl.")
    p.add_argument("save_path", help="training save_path (or a metrics.jsonl file)")
    p.add_argument("--out", help=f"PNG to write (default: <save_path>/{PLOT_FILE})")
    a = p.parse_args(argv)
    if a.out and not Path(a.out).absolute().parent.is_dir():
        print(f"error: {a.out}: cannot write the PNG: its directory does not exist", file=sys.stderr)
        return 2
    try:
        print(plot(a.save_path, a.out))
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # no metrics file (ours, no errno), unreadable, or a read-only --out dir
        print(f"error: {e}" if e.errno is None else f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


def main(argv=None, spelling: str = "python -m engine.training.metrics") -> int:
    """The command's earlier homes (`python -m engine.metrics plot`, `python -m engine.training.metrics
    plot`): still work, with a note naming the stable one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["plot"]:
        print(f"error: {spelling}: the only command is plot; use {PLOT_COMMAND} <save_path> [--out file.png]",
              file=sys.stderr)
        return 2
    print(f"note: '{spelling} plot' is now '{PLOT_COMMAND}' (the same arguments)", file=sys.stderr)
    return plot_command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
