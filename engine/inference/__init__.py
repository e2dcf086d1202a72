"""Inference: generation from a pipeline checkpoint or an HF dir."""
