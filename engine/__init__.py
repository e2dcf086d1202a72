"""Training engine: config, distributed set-up, checkpoints, conversion, the training loop."""
