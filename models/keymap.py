"""Our parameters <-> HF checkpoint tensors, as a family's `hf_keys` describes them.

A family's `hf_keys(args)` gives, per pipeline layer, {our parameter name: HF key} or
{our parameter name: Fused(...)} for a parameter that stacks several HF tensors (q/k/v, gate/up
projections run as one matmul). The stacking happens here, once, when a checkpoint is converted
or read from an HF dir; the layers never see the HF split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch


@dataclass(frozen=True)
class Fused:
    """One of our tensors = the HF tensors `keys` concatenated along dim 0, `sizes[i]` rows each.

    `old` names the separate parameters a pipeline checkpoint written before the fusion holds
    (same order), so such a checkpoint still loads (see `fuse_old_layout`).
    """

    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    old: tuple[str, ...]

    def prefixed(self, prefix: str) -> "Fused":
        return Fused(tuple(prefix + k for k in self.keys), self.sizes, self.old)


Source = Union[str, Fused]


def with_prefix(names: Mapping[str, Source], prefix: str) -> dict[str, Source]:
    """A layer's key map with `prefix` before every HF key ("model.layers.3.")."""
    return {ours: theirs.prefixed(prefix) if isinstance(theirs, Fused) else prefix + theirs
            for ours, theirs in names.items()}


def hf_names(theirs: Source) -> tuple[str, ...]:
    """The HF keys one of our tensors is made of."""
    return theirs.keys if isinstance(theirs, Fused) else (theirs,)


def hf_shapes(names: Mapping[str, Source], shapes: Mapping[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """{HF key: expected shape} of one layer, from our parameter shapes."""
    out = {}
    for ours, theirs in names.items():
        shape = tuple(shapes[ours])
        if isinstance(theirs, Fused):
            out.update({k: (n, *shape[1:]) for k, n in zip(theirs.keys, theirs.sizes)})
        else:
            out[theirs] = shape
    return out


def from_hf(names: Mapping[str, Source], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's state in our layout from HF tensors (`get(HF key)`), fused parts concatenated."""
    return {ours: torch.cat([get(k) for k in theirs.keys]) if isinstance(theirs, Fused) else get(theirs)
            for ours, theirs in names.items()}


def to_hf(names: Mapping[str, Source], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF key: tensor} of one layer from our state (fused tensors split back into copies: safetensors
    refuses tensors that share storage)."""
    out = {}
    for ours, theirs in names.items():
        if isinstance(theirs, Fused):
            out.update(zip(theirs.keys, (t.clone() for t in torch.split(state[ours], list(theirs.sizes)))))
        else:
            out[theirs] = state[ours]
    return out


def fuse_old_layout(state: dict, parts: Mapping[str, tuple[str, ...]], prefix: str = "") -> dict:
    """Concatenate, in place, the separate tensors of a checkpoint written before the fusion:
    parts = {fused name: (old name, ...)}; a state without them is left as it is."""
    for fused, old in parts.items():
        keys = [prefix + k for k in old]
        if prefix + fused not in state and keys and all(k in state for k in keys):
            state[prefix + fused] = torch.cat([state.pop(k) for k in keys])
    return state


def old_layout_parts(names: Mapping[str, Source]) -> dict[str, tuple[str, ...]]:
    """{fused name: old separate names} of one layer's key map (for `fuse_old_layout`)."""
    return {ours: theirs.old for ours, theirs in names.items() if isinstance(theirs, Fused)}


def upgrade_layer(names: Mapping[str, Source], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer file's state in today's layout (an old unfused file is fused; a current one is unchanged)."""
    return fuse_old_layout(dict(state), old_layout_parts(names))


def model_from_hf(family, args, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole model's state dict ("<layer>.<param>", as SequentialModel and the layer files
    name it) from HF tensors."""
    return {f"{i}.{ours}": t for i, names in enumerate(family.hf_keys(args)) for ours, t in from_hf(names, get).items()}


def model_to_hf(family, args, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF key: tensor} of a whole model's state dict ("<layer>.<param>"); a tied twin's layer
    may be absent (its owner holds the weight)."""
    out = {}
    for i, names in enumerate(family.hf_keys(args)):
        layer = {k: state[f"{i}.{k}"] for k in names if f"{i}.{k}" in state}
        if layer:
            out.update(to_hf(names, layer))
    return out


def unfused_names(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """{parameter name: the names its parts had before the fusion} for every fused parameter of
    `module` (state keyed by the old names, e.g. per-parameter optimizer state, can be joined)."""
    out = {}
    params = dict(module.named_parameters())
    for prefix, m in module.named_modules():
        for fused, old in getattr(m, "unfused_parts", {}).items():
            dot = f"{prefix}." if prefix else ""
            if dot + fused in params:
                out[dot + fused] = tuple(dot + o for o in old)
    return out
