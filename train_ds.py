"""Pipeline-parallel training: `deepspeed train_ds.py --config configs/tiny_llama_cpu.yml`.

`--dry-run --world-size N` prints per-stage memory/time estimates without a launcher;
`--export-hf OUT` turns the final checkpoint into an HF model dir (one-command fine-tune);
`python train_ds.py plot <save_path> [--out file.png]` redraws the loss curve from metrics.jsonl.
"""
import sys
from pathlib import Path

from engine.cli import run_script, add_plan_args, config_parser, parse_config, run_or_plan, user_errors
from engine.training.loop import train
from engine.training.metrics import plot_command


@user_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:  # redraw <save_path>/loss.png from metrics.jsonl (no config, no launcher)
        sys.exit(plot_command(argv[1:], prog=f"python {Path(__file__).name} plot"))
    a, cfg = parse_config(add_plan_args(config_parser(__doc__)), argv)
    run_or_plan(a, cfg, train)


if __name__ == "__main__":
    run_script(main)
