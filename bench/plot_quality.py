"""FP8 quality gate: loss curves of runs from the same start on the same data, plotted together.

    python bench/plot_quality.py RUN_DIR_BF16 RUN_DIR_FP8 [...] out.png [--last 20] [--tol 0.01]

Each RUN_DIR holds a metrics.jsonl (bench_train.py / engine.train). Prints each run's final
loss (mean of the last --last steps) and its relative difference to the first run's; exits 1
when one differs by more than --tol.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def losses(run_dir: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run dirs, then the PNG to write")
    p.add_argument("--last", type=int, default=20)
    p.add_argument("--tol", type=float, default=0.01)
    a = p.parse_args()
    runs, png = [Path(x) for x in a.paths[:-1]], Path(a.paths[-1])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    finals, ok = [], True
    for run in runs:
        steps, loss = losses(run)
        ax.plot(steps, loss, label=run.name, linewidth=1)
        finals.append(statistics.mean(loss[-a.last:]))
        rel = (finals[-1] - finals[0]) / finals[0]
        ok &= abs(rel) <= a.tol
        print(f"{run.name}: {len(steps)} steps, final loss (mean of last {a.last}) {finals[-1]:.4f}, "
              f"vs {runs[0].name} {100 * rel:+.2f}%")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"{'PASS' if ok else 'FAIL'}: final losses within {100 * a.tol:g}% of {runs[0].name}; plot {png}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
