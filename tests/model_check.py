"""Numerics helpers for the per-family tests: `sequential_forward` runs a family's layers in one
process from a state dict in our checkpoint layout ("<layer>.<param>"). The pipeline checks
every family gets are in tests/test_families.py.
"""
from __future__ import annotations

import torch


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return labels


def sequential_forward(family_name: str, hf_config: dict, state: dict, ids: torch.Tensor, labels: torch.Tensor):
    from models import get_family
    from models.pipeline import SequentialModel, make_loss

    family = get_family(family_name)
    args = family.Args.from_hf_config(hf_config)
    model = SequentialModel(family, args).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        out = model(ids)
        n = (labels != -100).sum()
        loss = make_loss(family, args)(out, (labels, torch.tensor(1.0) / n))
    return float(loss), out
