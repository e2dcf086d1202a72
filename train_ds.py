"""Pipeline-parallel training: `deepspeed train_ds.py --config configs/tiny_llama_cpu.yml`.

`--dry-run --world-size N` prints per-stage memory/time estimates without a launcher;
`--export-hf OUT` turns the final checkpoint into an HF model dir (one-command fine-tune);
`python train_ds.py plot <save_path> [--out file.png]` redraws the loss curve from metrics.jsonl.
"""
from engine.cli import (run_script, add_plan_args, config_parser, parse_config, plot_or_argv, run_or_plan,
                        user_errors)
from engine.training.loop import train


@user_errors
def main(argv=None):
    a, cfg = parse_config(add_plan_args(config_parser(__doc__)), plot_or_argv(argv, __file__))
    run_or_plan(a, cfg, train)


if __name__ == "__main__":
    run_script(main)
