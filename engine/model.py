"""What the engine knows about a model: its family, its Args, where its HF files are, its layers.

One descriptor used by training, planning, conversion and generation (`Model.from_dir`), and the
per-layer parameter shapes every loader checks against (`expected_shapes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from models import family_for_hf_config
from models.pipeline import SequentialModel, layer_groups

from engine.checkpoints.files import hf_dir_of, read_hf_config


def expected_shapes(family, args) -> list[dict[str, torch.Size]]:
    """Per internal layer: {param name: shape}, from the family's layers built on the meta device."""
    with torch.device("meta"):
        model = SequentialModel(family, args)
    return [{k: p.shape for k, p in model._modules[str(i)].state_dict().items()} for i in range(len(model.defs))]


@dataclass
class Model:
    """What the loop needs to know about the model being trained."""

    family: object
    args: object
    hf_dir: Path
    n_layers: int  # pipeline layers as `parts` counts them

    @classmethod
    def from_dir(cls, model_path: str | Path) -> "Model":
        hf_dir = hf_dir_of(model_path)
        hf = read_hf_config(hf_dir)
        family = family_for_hf_config(hf, str(hf_dir / "config.json"))
        args = family.Args.from_hf_config(hf)
        return cls(family, args, hf_dir, len(layer_groups(family, args)))

    @property
    def name(self) -> str:
        return self.family.__name__.split(".")[-1]

    def n_params(self) -> int:
        seen, total = set(), 0
        for idx, (layer, shapes) in enumerate(zip(self.family.hf_keys(self.args), expected_shapes(self.family, self.args))):
            for ours, theirs in layer.items():
                if theirs not in seen:
                    seen.add(theirs)
                    total += math.prod(shapes[ours])
        return total
