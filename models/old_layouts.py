"""Loading checkpoints written before a fusion: a module's state-dict pre-hook concatenates the old
separate parameters (q/k/v, gate/up, per-expert) into the fused one (models/keymap.fuse_old_layout).
"""
from __future__ import annotations

import functools

from torch import nn

from .keymap import fuse_old_layout


def accept_unfused(module: nn.Module, fused: str, parts: tuple[str, ...]) -> None:
    """Let `module` load a state dict written when its fused linear `fused` was the separate
    linears `parts` (pipeline checkpoints from before the fusion, DeepSpeed resume included)."""
    accept_old_layout(module, {f"{fused}.{kind}": tuple(f"{p}.{kind}" for p in parts) for kind in ("weight", "bias")})


def accept_old_layout(module: nn.Module, mapping: dict) -> None:
    """Let `module` load a state dict in a layout from before a fusion: mapping = {parameter:
    (old names, concatenated along dim 0)} or {parameter: keymap.Fused} (its `old` names, relative
    to `module`, joined as Fused.join: stacked experts)."""
    module.unfused_parts = mapping  # read by keymap.unfused_names (optimizer state of old checkpoints)
    module.register_load_state_dict_pre_hook(functools.partial(_fuse_on_load, mapping))


def _fuse_on_load(mapping, module, state_dict, prefix, *_):
    fuse_old_layout(state_dict, mapping, prefix)
