"""ZeRO-1/2/3 training (optional CPU offload) of the whole model as one module, with the same
config, data, checkpoints and export as train_ds.py:
`deepspeed train_ds_zero.py --config configs/ds_config_zero.yml`."""
from engine.cli import config_parser, parse_config, user_errors
from engine.training.loop import train_zero


@user_errors
def main(argv=None):
    _, cfg = parse_config(config_parser(__doc__), argv)
    train_zero(cfg)


if __name__ == "__main__":
    main()
