"""Several training runs one after another in one launch, for tests that compare layouts:
`deepspeed --num_gpus N tests/launch_configs.py --config runs.yml`, runs.yml a list of
{kind: pipe | zero, config: <training config file>}, runs train_ds.py's (pipe) or train_ds_zero.py's
(zero) training function on each config in turn, in the same processes: one launcher start-up for
several runs of one topology."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    import yaml

    from engine.config import load_config
    from engine.training.loop import train, train_zero

    runs = yaml.safe_load(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
    for run in runs:
        {"pipe": train, "zero": train_zero}[run["kind"]](load_config(run["config"]))


if __name__ == "__main__":
    from engine.cli import run_script

    run_script(main)
