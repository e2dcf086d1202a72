"""Our parameters <-> HF checkpoint tensors, as a family's `hf_keys` describes them.

A family's `hf_keys(args)` gives, per pipeline layer, {our parameter name: HF key} or
{our parameter name: Fused(...)} for a parameter that stacks several HF tensors (q/k/v, gate/up
projections run as one matmul; an MoE layer's experts held as one [experts, rows, cols] tensor
per projection, `Fused.stack`). The stacking happens here, once, when a checkpoint is converted
or read from an HF dir; the layers never see the HF split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch


@dataclass(frozen=True)
class Fused:
    """One of our tensors = the HF tensors `keys` concatenated along dim 0, `sizes[i]` rows each;
    with `stack` > 0, that concatenation viewed as [stack, rows / stack, ...] (an MoE layer's
    experts stored stacked: keys expert by expert, e.g. w1, w3 of expert 0, then of expert 1, ...).
    Either way the tensor's memory is the parts one after the other, so a flat view of it is the
    parts' flat views concatenated (optimizer state of old checkpoints is joined that way).

    `old` names the separate parameters a pipeline checkpoint written before the fusion holds
    (same order), so such a checkpoint still loads (see `fuse_old_layout`).
    """

    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    old: tuple[str, ...]
    stack: int = 0

    def prefixed(self, prefix: str) -> "Fused":
        return Fused(tuple(prefix + k for k in self.keys), self.sizes, self.old, self.stack)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Our tensor from its parts (HF's or the old checkpoint's, in `keys` order)."""
        t = torch.cat(parts)
        return t.view(self.stack, -1, *t.shape[1:]) if self.stack else t

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts of our tensor (views), in `keys` order."""
        return torch.split(t.flatten(0, 1) if self.stack else t, list(self.sizes))

    def part_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The parts' shapes, from our tensor's shape."""
        cols = shape[2:] if self.stack else shape[1:]
        return [(n, *cols) for n in self.sizes]


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
            out.update(zip(theirs.keys, theirs.part_shapes(shape)))
        else:
            out[theirs] = shape
    return out


def from_hf(names: Mapping[str, Source], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's state in our layout from HF tensors (`get(HF key)`), fused parts concatenated
    (stacked: then viewed per expert)."""
    return {ours: theirs.join([get(k) for k in theirs.keys]) if isinstance(theirs, Fused) else get(theirs)
            for ours, theirs in names.items()}


def to_hf(names: Mapping[str, Source], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF key: tensor} of one layer from our state (fused tensors split back into copies: safetensors
    refuses tensors that share storage)."""
    out = {}
    for ours, theirs in names.items():
        if isinstance(theirs, Fused):
            out.update(zip(theirs.keys, (t.clone() for t in theirs.split(state[ours]))))
        else:
            out[theirs] = state[ours]
    return out


def fuse_old_layout(state: dict, parts: Mapping[str, Union[tuple[str, ...], Fused]], prefix: str = "") -> dict:
    """Join, in place, the separate tensors of a checkpoint written before the fusion:
    parts = {fused name: (old name, ...)} (concatenated along dim 0) or {fused name: Fused} (its
    `old` names, joined as `Fused.join`: stacked experts); a state without them is left as it is."""
    for fused, spec in parts.items():
        old = spec.old if isinstance(spec, Fused) else spec
        keys = [prefix + k for k in old]
        if prefix + fused not in state and keys and all(k in state for k in keys):
            tensors = [state.pop(k) for k in keys]
            state[prefix + fused] = spec.join(tensors) if isinstance(spec, Fused) else torch.cat(tensors)
    return state


def old_layout_parts(names: Mapping[str, Source]) -> dict[str, Fused]:
    """{fused name: its Fused entry} of one layer's key map (for `fuse_old_layout`)."""
    return {ours: theirs for ours, theirs in names.items() if isinstance(theirs, Fused)}


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
        for fused, spec in getattr(m, "unfused_parts", {}).items():
            old = spec.old if isinstance(spec, Fused) else spec
            dot = f"{prefix}." if prefix else ""
            if dot + fused in params:
                out[dot + fused] = tuple(dot + o for o in old)
    return out
