"""`python -m engine.metrics plot <save_path>`: where the plot command first lived (before engine/
was split into checkpoints/training/inference). It still works, with a note naming its stable
home, `python train_ds.py plot` (engine/training/metrics.py plot_command)."""
import sys

from engine.training.metrics import main

if __name__ == "__main__":
    sys.exit(main(spelling="python -m engine.metrics"))
