"""LoRA: low-rank adapters on the transformer blocks' linears, named and shaped as PEFT names them.

An adapted linear computes `base(x) + scaling * B_t(A_t(dropout(x)))` on the output rows of each
HF target t it holds (scaling = alpha / r, PEFT's default). Our blocks fuse q/k/v and gate/up
into one linear (models/norm_mlp.py `fused_linear`); in the HF model those are separate modules,
each with its own A/B pair in a PEFT adapter. PEFT's LoraLayer wraps one whole linear with one
pair, so it cannot express that: here one small wrapper serves both kinds, a plain linear (one
target covering all rows) and a fused one (one target per HF slice, `keymap.Fused`'s order and
sizes). Where the HF model fuses as well (bloom's and chatglm's query_key_value, baichuan's
W_pack, chatglm's dense_h_to_4h) the HF target is the fused module and has one pair, as in PEFT.
The adapters are plain parameters, not nn.Linear modules, so the module swaps of the pipeline
(torchao float8, the wgrad fusion) touch only the frozen base; peft itself is the outside judge
in tests/test_lora.py (adapter exports load in PeftModel with equal logits).

Which linears are targets follows the HF model's module structure, from the family's `hf_keys`:
an HF key `...layers.3.self_attn.q_proj.weight` names the target `q_proj` of module
`...layers.3.self_attn.q_proj`. Families whose linears are no nn.Linear in transformers (mixtral's
experts and router) list them in `HF_NOT_LINEAR` (prefixes of our parameter names); `all-linear`
means what PEFT means: every linear of the blocks (the output layer never).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .block_base import BlockBase, LayerOptions
from .keymap import Fused

ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix before the HF model's own keys


@dataclass(frozen=True)
class LoraSpec:
    """What the `lora:` config section says (engine/config.py LoraConfig; read by attribute)."""

    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    modules_to_save: tuple[str, ...] = ()

    @classmethod
    def of(cls, section) -> "LoraSpec | None":
        """The spec of a config's `lora` section (anything with its attributes, or a dict); None when r is 0."""
        get = section.get if isinstance(section, dict) else lambda k, d=None: getattr(section, k, d)
        if not section or not get("r", 0):
            return None
        targets = get("target_modules", ALL_LINEAR)
        return cls(int(get("r")), float(get("alpha", 16.0)), float(get("dropout", 0.0)),
                   targets if isinstance(targets, str) else tuple(targets), tuple(get("modules_to_save") or ()))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self, hf_module: str) -> bool:
        return self.target_modules == ALL_LINEAR or any(_matches(hf_module, t) for t in self.target_modules)

    def saves(self, hf_module: str) -> bool:
        return any(_matches(hf_module, m) for m in self.modules_to_save)

    def record(self) -> dict:
        """JSON form (checkpoint meta.json)."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
                "modules_to_save": list(self.modules_to_save)}


def _matches(hf_module: str, name: str) -> bool:
    """PEFT's rule for a target or modules_to_save name: the module's full name or its last parts."""
    return hf_module == name or hf_module.endswith("." + name)


def _module(hf_key: str) -> str:
    return hf_key.rsplit(".", 1)[0]


def short(hf_module: str) -> str:
    return hf_module.rsplit(".", 1)[-1]


def hf_slices(theirs) -> list[tuple[str, int | None]]:
    """(HF module, rows) per target of one of our linear weights' hf_keys entry (None: all rows)."""
    if isinstance(theirs, Fused):
        return [(_module(k), n) for k, n in zip(theirs.keys, theirs.sizes)]
    return [(_module(theirs), None)]


def block_linears(family: ModuleType, args) -> dict[str, nn.Linear]:
    """{our module name: linear} of one transformer block (built on the meta device) that can be
    adapted: nn.Linear here and in the HF model."""
    skip = tuple(getattr(family, "HF_NOT_LINEAR", ()))
    block_def = next(d for g in family.layers(args) for d in g if issubclass(d.cls, BlockBase))
    with torch.device("meta"):
        block = block_def.cls(args, LayerOptions())
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n and not n.startswith(skip)}


def _block_keys(family: ModuleType, args) -> dict:
    """hf_keys entry of the first transformer block."""
    defs = [d for g in family.layers(args) for d in g]
    return family.hf_keys(args)[next(i for i, d in enumerate(defs) if issubclass(d.cls, BlockBase))]


def block_targets(family: ModuleType, args) -> list[str]:
    """The full HF module names of the first block's adaptable linears' targets, in block order."""
    keys = _block_keys(family, args)
    return [hf for name in block_linears(family, args) for hf, _ in hf_slices(keys[f"{name}.weight"])]


def check_spec(spec: LoraSpec, family: ModuleType, args) -> None:
    """ValueError (one line, naming the key) for a target or modules_to_save name the model lacks."""
    offered = block_targets(family, args)
    kind = family.__name__.rsplit(".", 1)[-1]
    for t in () if spec.target_modules == ALL_LINEAR else spec.target_modules:
        if not any(_matches(o, t) for o in offered):
            raise ValueError(f"lora.target_modules: {t!r} is no adaptable linear of this {kind} model (its blocks' "
                             f"linears: {', '.join(dict.fromkeys(short(o) for o in offered))}; or all-linear)")
    whole = {_module(k) for layer in family.hf_keys(args) for k in layer.values() if isinstance(k, str)}
    for m in spec.modules_to_save:
        if not any(_matches(n, m) for n in whole):
            raise ValueError(f"lora.modules_to_save: {m!r} matches no whole module of this {kind} model (e.g. "
                             f"{', '.join(sorted({short(n) for n in whole if not any(c.isdigit() for c in n)}))})")


# ----------------------------------------------------------------------------- the adapted linear
class LoraLinear:
    """Mixin put in front of a linear's own class (nn.Linear, torchao's Float8Linear, the wgrad-fused
    linear): its weight and bias keep their names and objects, so base checkpoints load as before.
    `lora_A[t]` [r, in], `lora_B[t]` [rows of t, r] per target t; `lora_slices` lists the output rows
    in order as (target or None, rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        names = [t for t, _ in self.lora_slices if t is not None]
        h = F.linear(self.lora_dropout(x), torch.cat([self.lora_A[t] for t in names]))
        deltas = dict(zip(names, h.split(self.lora_r, dim=-1)))
        if len(self.lora_slices) == 1:
            return out + F.linear(deltas[names[0]], self.lora_B[names[0]]) * self.lora_scaling
        parts = out.split([n for _, n in self.lora_slices], dim=-1)
        return torch.cat([p if t is None else p + F.linear(deltas[t], self.lora_B[t]) * self.lora_scaling
                          for p, (t, _) in zip(parts, self.lora_slices)], dim=-1)


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if issubclass(cls, LoraLinear):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraLinear, cls), {})
    return _CLASSES[cls]


def adapt(linear: nn.Linear, slices: list[tuple[str | None, int]], spec: LoraSpec, gen: torch.Generator) -> None:
    """Make `linear` a LoraLinear with fresh adapters: A as PEFT initialises it (kaiming-uniform,
    a=sqrt(5)), B zero, so the model starts out equal to the base."""
    device = linear.weight.device
    linear.lora_A, linear.lora_B = nn.ParameterDict(), nn.ParameterDict()
    for t, rows in slices:
        if t is None:
            continue
        a = torch.empty(spec.r, linear.in_features)
        bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        a.uniform_(-bound, bound, generator=gen)
        linear.lora_A[t] = nn.Parameter(a.to(device))
        linear.lora_B[t] = nn.Parameter(torch.zeros(rows, spec.r, device=device))
    linear.lora_slices, linear.lora_r, linear.lora_scaling = slices, spec.r, spec.scaling
    linear.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
    linear.__class__ = _lora_class(type(linear))


def add_lora(layers, family: ModuleType, args, spec: LoraSpec, seed: int) -> int:
    """Adapt the targeted linears of every transformer block in `layers` ((global internal layer
    index, module) pairs), then freeze every parameter but the adapters and modules_to_save.
    Adapters are seeded by the layer's global index: every layout starts from the same ones.
    Returns the number of trainable parameters here."""
    keys = family.hf_keys(args)
    adaptable = set(block_linears(family, args))
    for idx, layer in layers:
        if not isinstance(layer, BlockBase):
            continue
        gen = torch.Generator().manual_seed(seed * 100_003 + idx + 7_919)
        for name, m in list(layer.named_modules()):
            if name not in adaptable:
                continue
            slices = [(short(hf) if spec.targets(hf) else None, rows if rows is not None else m.out_features)
                      for hf, rows in hf_slices(keys[idx][f"{name}.weight"])]
            if any(t is not None for t, _ in slices):
                adapt(m, slices, spec, gen)
    n = 0
    for idx, layer in layers:
        for name, p in layer.named_parameters():
            p.requires_grad_(is_trainable(name, keys[idx], spec))
            n += getattr(p, "ds_numel", p.numel()) if p.requires_grad else 0  # ZeRO-3: the full size
    return n


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def is_trainable(name: str, layer_keys: dict, spec: LoraSpec) -> bool:
    """An adapter, or a parameter of a modules_to_save module (whole modules only: not a part of a fused one)."""
    if is_adapter(name):
        return True
    theirs = layer_keys.get(name)
    return isinstance(theirs, str) and spec.saves(_module(theirs))


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in module.modules())


def adapter_numel(family: ModuleType, args, spec: LoraSpec) -> int:
    """Adapter parameters of one block (the dry-run's count; modules_to_save not included)."""
    keys, n = _block_keys(family, args), 0
    for name, m in block_linears(family, args).items():
        for hf, rows in hf_slices(keys[f"{name}.weight"]):
            if spec.targets(hf):
                n += spec.r * (m.in_features + (rows if rows is not None else m.out_features))
    return n


# ----------------------------------------------------------------------------- state <-> PEFT / merged
def split_name(name: str) -> tuple[str, str, str] | None:
    """'self_attn.qkv_proj.lora_A.q_proj' -> ('self_attn.qkv_proj', 'lora_A', 'q_proj'); None for a base parameter."""
    for kind in ("lora_A", "lora_B"):
        module, sep, target = name.rpartition(f".{kind}.")
        if sep:
            return module, kind, target
    return None


def _target_module(layer_keys: dict, module: str, target: str) -> tuple[str, int, int | None]:
    """(HF module, first row, rows) of target `target` of our linear `module`."""
    offset = 0
    for hf, rows in hf_slices(layer_keys[f"{module}.weight"]):
        if short(hf) == target:
            return hf, offset, rows
        offset += rows or 0
    raise KeyError(f"{module}: no LoRA target {target!r}")


def to_peft(layer_keys: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's trainable state (ours) -> PEFT adapter keys and tensors."""
    from .keymap import to_hf

    out, saved = {}, {}
    for name, t in state.items():
        parts = split_name(name)
        if parts is None:
            saved[name] = t
            continue
        module, kind, target = parts
        hf, _, _ = _target_module(layer_keys, module, target)
        out[f"{PEFT_PREFIX}{hf}.{kind}.weight"] = t
    out.update({PEFT_PREFIX + k: v for k, v in to_hf({k: layer_keys[k] for k in saved}, saved).items()})
    return out


def from_peft(layer_keys: dict, adapter: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Our trainable state `names` of one layer from a PEFT adapter's tensors (keys with or without
    PEFT's adapter-name infix)."""
    out = {}
    for name in names:
        parts = split_name(name)
        if parts is None:
            out[name] = adapter[PEFT_PREFIX + layer_keys[name]]
            continue
        module, kind, target = parts
        hf, _, _ = _target_module(layer_keys, module, target)
        out[name] = adapter[f"{PEFT_PREFIX}{hf}.{kind}.weight"]
    return out


def merge(layer_keys: dict, base: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor],
          scaling: float) -> dict[str, torch.Tensor]:
    """One layer's base state with its adapters merged in (W[rows of t] += scaling * B_t A_t, in
    fp32, cast back to the base's dtype) and its modules_to_save replaced by their trained values."""
    out = dict(base)
    for name, t in trainable.items():
        if split_name(name) is None:
            out[name] = t.to(base[name].dtype)
    for name, a in trainable.items():
        parts = split_name(name)
        if parts is None or parts[1] != "lora_A":
            continue
        module, _, target = parts
        _, offset, rows = _target_module(layer_keys, module, target)
        b = trainable[f"{module}.lora_B.{target}"]
        key = f"{module}.weight"
        w = out[key].float().clone()
        rows = rows if rows is not None else w.shape[0]
        w[offset:offset + rows] += scaling * (b.float() @ a.float())
        out[key] = w.to(base[key].dtype)
    return out


def peft_config(spec: LoraSpec, targets: list[str], base: str | None) -> dict:
    """adapter_config.json of an export (PEFT fills every field left out with its default)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "target_modules": sorted(targets), "bias": "none",
            "modules_to_save": list(spec.modules_to_save) or None, "fan_in_fan_out": False,
            "base_model_name_or_path": base, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False}
