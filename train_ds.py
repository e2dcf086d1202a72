"""Pipeline-parallel training: `deepspeed train_ds.py --config configs/tiny_llama_cpu.yml`."""
from engine.cli import config_parser, parse_config, user_errors
from engine.train import train


@user_errors
def main(argv=None):
    _, cfg = parse_config(config_parser(__doc__), argv)
    train(cfg)


if __name__ == "__main__":
    main()
