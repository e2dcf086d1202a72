"""Checkpoint formats on disk: files and tags, HF <-> pipeline conversion, reshape, the weight loader."""
from engine.checkpoints import gdgpt  # noqa: F401  registers gdGPT's dir layouts with files.locate, for every user
