"""The training run: loop, backends (pipeline / ZeRO), DeepSpeed set-up, signals, optimizer, eval, metrics."""
