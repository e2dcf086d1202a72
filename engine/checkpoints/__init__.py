"""Checkpoint formats on disk: files and tags, HF <-> pipeline conversion, reshape, the weight loader."""
