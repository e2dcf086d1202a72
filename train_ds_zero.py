"""ZeRO-1/2/3 training (optional CPU offload) of the whole model as one module, with the same
config, data, checkpoints and export as train_ds.py:
`deepspeed train_ds_zero.py --config configs/ds_config_zero.yml`.

`--dry-run --world-size N` validates the config and prints the per-rank memory estimate
without a launcher; `--export-hf OUT` turns the final checkpoint into an HF model dir;
`python train_ds_zero.py plot <save_path> [--out file.png]` redraws the loss curve from metrics.jsonl."""
from engine.cli import (run_script, add_plan_args, config_parser, parse_config, plot_or_argv, run_or_plan,
                        user_errors)
from engine.training.loop import train_zero


@user_errors
def main(argv=None):
    a, cfg = parse_config(add_plan_args(config_parser(__doc__)), plot_or_argv(argv, __file__))
    run_or_plan(a, cfg, train_zero, pipeline=False)


if __name__ == "__main__":
    run_script(main)
