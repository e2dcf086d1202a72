"""LoRA: low-rank adapters on the transformer blocks' linears, named and shaped as PEFT names them.

An adapted linear computes `base(x) + scaling * B_t(A_t(dropout(x)))` on the output rows of each
HF target t it holds (scaling = alpha / r, PEFT's default; alpha / sqrt(r) with use_rslora). DoRA
(use_dora) rescales each target's rows by a trained magnitude over the row norm of W_t + scaling B_t A_t,
as PEFT's DoraLinearLayer does; the norm is per output row, so a fused linear's slices each get theirs. Our blocks fuse q/k/v and gate/up
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
import re
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .block_base import BlockBase, LayerOptions
from .keymap import Fused

ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix before the HF model's own keys
INITS = (True, False, "gaussian")  # PEFT's init_lora_weights values implemented here
MAGNITUDE = "lora_magnitude_vector"  # DoRA's per-row magnitudes (PEFT's name)
KINDS = ("lora_A", "lora_B", MAGNITUDE)


@dataclass(frozen=True)
class LoraSpec:
    """What the `lora:` config section says (engine/config.py LoraConfig; read by attribute)."""

    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ALL_LINEAR  # names, all-linear, or a regex (PEFT: re.fullmatch)
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None  # PEFT's: the module-name part before the layer index
    use_dora: bool = False

    @classmethod
    def of(cls, section) -> "LoraSpec | None":
        """The spec of a config's `lora` section (anything with its attributes, or a dict); None when r is 0."""
        get = section.get if isinstance(section, dict) else lambda k, d=None: getattr(section, k, d)
        if not section or not get("r", 0):
            return None
        targets = get("target_modules", ALL_LINEAR)
        layers, pattern = get("layers_to_transform"), get("layers_pattern")
        return cls(int(get("r")), float(get("alpha", 16.0)), float(get("dropout", 0.0)),
                   targets if isinstance(targets, str) else tuple(targets), tuple(get("modules_to_save") or ()),
                   bool(get("use_rslora", False)), get("init_lora_weights", True),
                   None if layers is None else (layers,) if isinstance(layers, int) else tuple(layers),
                   None if not pattern else (pattern,) if isinstance(pattern, str) else tuple(pattern),
                   bool(get("use_dora", False)))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def targets(self, hf_module: str) -> bool:
        """PEFT's rule (check_target_module_exists): a regex string must match the whole module
        name, a name its full name or last parts; layers_to_transform then keeps the blocks listed."""
        t = self.target_modules
        if isinstance(t, str) and t != ALL_LINEAR:
            return re.fullmatch(t, hf_module) is not None
        if t != ALL_LINEAR and not any(_matches(hf_module, n) for n in t):
            return False
        return self.layers_to_transform is None or layer_index(hf_module, self.layers_pattern) in self.layers_to_transform

    def saves(self, hf_module: str) -> bool:
        return any(_matches(hf_module, m) for m in self.modules_to_save)

    def record(self) -> dict:
        """JSON form (checkpoint meta.json); PEFT's options only where not their defaults, so the
        tags written before they existed read as the same adapters."""
        out = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
               "target_modules": self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
               "modules_to_save": list(self.modules_to_save)}
        for key, default in OPTION_DEFAULTS.items():
            value = getattr(self, key)
            if value != default:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


OPTION_DEFAULTS = {"use_rslora": False, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
                   "use_dora": False}


def layer_index(hf_module: str, patterns: tuple[str, ...] | None = None) -> int | None:
    """The block index in an HF module name, as PEFT finds it for layers_to_transform: the first
    numbered part (after one of `patterns` when given)."""
    for pattern in patterns or (None,):
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.",
                     hf_module)
        if m:
            return int(m.group("idx"))
    return None


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


def all_targets(family: ModuleType, args) -> list[str]:
    """The full HF module names of every block's adaptable linears' targets."""
    keys, names, out = family.hf_keys(args), list(block_linears(family, args)), []
    for d, layer in zip([d for g in family.layers(args) for d in g], keys):
        if issubclass(d.cls, BlockBase):
            out += [hf for name in names for hf, _ in hf_slices(layer[f"{name}.weight"])]
    return out


def check_spec(spec: LoraSpec, family: ModuleType, args) -> None:
    """ValueError (one line, naming the key) for a target or modules_to_save name the model lacks."""
    offered = block_targets(family, args)
    kind = family.__name__.rsplit(".", 1)[-1]
    linears = f"its blocks' linears: {', '.join(dict.fromkeys(short(o) for o in offered))}"
    if isinstance(spec.target_modules, str) and spec.target_modules != ALL_LINEAR:
        if not any(spec.targets(hf) for hf in all_targets(family, args)):
            raise ValueError(f"lora.target_modules: the regex {spec.target_modules!r} matches no adaptable linear of "
                             f"this {kind} model (it must match a whole module name such as {offered[0]!r}; {linears})")
    for t in () if isinstance(spec.target_modules, str) else spec.target_modules:
        if not any(_matches(o, t) for o in offered):
            raise ValueError(f"lora.target_modules: {t!r} is no adaptable linear of this {kind} model ({linears}; "
                             "or all-linear)")
    blocks = sorted({layer_index(hf, spec.layers_pattern) for hf in all_targets(family, args)} - {None})
    if spec.layers_to_transform is not None and blocks:
        bad = [i for i in spec.layers_to_transform if i not in blocks]
        if bad:
            raise ValueError(f"lora.layers_to_transform: block {bad[0]} is not in this {kind} model (blocks "
                             f"{blocks[0]}..{blocks[-1]}{'' if spec.layers_pattern is None else ' by layers_pattern'})")
    if spec.layers_to_transform is not None and not blocks:
        raise ValueError(f"lora.layers_pattern: {list(spec.layers_pattern or ())} finds no block index in this {kind} "
                         f"model's module names (e.g. {offered[0]!r})")
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
        if hasattr(self, MAGNITUDE):
            return self._dora_forward(x)
        out = super().forward(x)
        names = [t for t, _ in self.lora_slices if t is not None]
        h = F.linear(self.lora_dropout(x), torch.cat([self.lora_A[t] for t in names]))
        deltas = dict(zip(names, h.split(self.lora_r, dim=-1)))
        if len(self.lora_slices) == 1:
            return out + F.linear(deltas[names[0]], self.lora_B[names[0]]) * self.lora_scaling
        parts = out.split([n for _, n in self.lora_slices], dim=-1)
        return torch.cat([p if t is None else p + F.linear(deltas[t], self.lora_B[t]) * self.lora_scaling
                          for p, (t, _) in zip(parts, self.lora_slices)], dim=-1)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoraLinearLayer per target slice t: out_t + (m_t / n_t - 1) W_t x' + m_t / n_t s B_t A_t x',
        n_t the row norms of W_t + s B_t A_t (detached, in x's dtype), x' = dropout(x); without
        dropout W_t x' is the base output less its bias."""
        out = super().forward(x)
        dropped = not isinstance(self.lora_dropout, nn.Identity) and self.training
        xd = self.lora_dropout(x)
        parts, offset, result = out.split([n for _, n in self.lora_slices], dim=-1), 0, []
        for p, (t, rows) in zip(parts, self.lora_slices):
            w = self.weight[offset:offset + rows]
            b = None if self.bias is None else self.bias[offset:offset + rows]
            offset += rows
            if t is None:
                result.append(p)
                continue
            a_t, b_t, s = self.lora_A[t], self.lora_B[t], self.lora_scaling
            delta = (b_t @ a_t).to(x.dtype)
            norm = torch.linalg.norm(w.to(x.dtype) + s * delta.detach(), dim=1).detach()
            scale = getattr(self, MAGNITUDE)[t].to(x.dtype) / norm
            base = F.linear(xd, w.to(x.dtype)) if dropped else (p if b is None else p - b)
            result.append(p + (scale - 1) * base + scale * F.linear(F.linear(xd, a_t.to(x.dtype)), b_t.to(x.dtype)) * s)
        return torch.cat(result, dim=-1) if len(result) > 1 else result[0]


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if issubclass(cls, LoraLinear):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraLinear, cls), {})
    return _CLASSES[cls]


def _uniform(shape, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def adapt(linear: nn.Linear, slices: list[tuple[str | None, int]], spec: LoraSpec, gen: torch.Generator) -> None:
    """Make `linear` a LoraLinear with fresh adapters, initialised as PEFT's init_lora_weights says:
    true: A kaiming-uniform (a=sqrt(5)), B zero, so the model starts out equal to the base;
    gaussian: A normal with std 1/r, B zero; false: both as nn.Linear initialises them (not the base).
    DoRA: each target's magnitude starts as the row norms of W_t + scaling B_t A_t (PEFT's update_layer)."""
    device = linear.weight.device
    linear.lora_A, linear.lora_B = nn.ParameterDict(), nn.ParameterDict()
    offset = 0
    for t, rows in slices:
        offset += rows
        if t is None:
            continue
        if spec.init_lora_weights == "gaussian":
            a = torch.empty(spec.r, linear.in_features).normal_(0, 1 / spec.r, generator=gen)
        else:
            a = _uniform((spec.r, linear.in_features), linear.in_features, gen)
        b = _uniform((rows, spec.r), spec.r, gen) if spec.init_lora_weights is False else torch.zeros(rows, spec.r)
        linear.lora_A[t] = nn.Parameter(a.to(device))
        linear.lora_B[t] = nn.Parameter(b.to(device))
        if spec.use_dora:
            if not hasattr(linear, MAGNITUDE):
                setattr(linear, MAGNITUDE, nn.ParameterDict())
            w = linear.weight[offset - rows:offset].detach().float()
            norm = torch.linalg.norm(w + spec.scaling * (b.to(w.device) @ a.to(w.device)), dim=1)
            getattr(linear, MAGNITUDE)[t] = nn.Parameter(norm.to(device))
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
    return any(f".{k}." in name or name.startswith(f"{k}.") for k in KINDS)


def is_trainable(name: str, layer_keys: dict, spec: LoraSpec) -> bool:
    """An adapter, or a parameter of a modules_to_save module (whole modules only: not a part of a fused one)."""
    if is_adapter(name):
        return True
    theirs = layer_keys.get(name)
    return isinstance(theirs, str) and spec.saves(_module(theirs))


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in module.modules())


def adapter_numel(family: ModuleType, args, spec: LoraSpec, layer_keys: dict | None = None) -> int:
    """Adapter parameters of one block (the first, or the one of `layer_keys`: a regex or
    layers_to_transform may pick blocks apart), the dry-run's count; modules_to_save not included."""
    keys, n = layer_keys or _block_keys(family, args), 0
    for name, m in block_linears(family, args).items():
        for hf, rows in hf_slices(keys[f"{name}.weight"]):
            if spec.targets(hf):
                rows = rows if rows is not None else m.out_features
                n += spec.r * (m.in_features + rows) + (rows if spec.use_dora else 0)
    return n


# ----------------------------------------------------------------------------- state <-> PEFT / merged
def split_name(name: str) -> tuple[str, str, str] | None:
    """'self_attn.qkv_proj.lora_A.q_proj' -> ('self_attn.qkv_proj', 'lora_A', 'q_proj'); None for a base parameter."""
    for kind in KINDS:
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
        out[peft_key(hf, kind)] = t
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
        out[name] = adapter[peft_key(hf, kind)]
    return out


def peft_key(hf_module: str, kind: str) -> str:
    """PEFT's saved key of one adapter tensor (lora_A/lora_B are Linear weights, DoRA's magnitude a bare vector)."""
    return f"{PEFT_PREFIX}{hf_module}.{kind}" + ("" if kind == MAGNITUDE else ".weight")


def peft_name(layer_keys: dict, name: str) -> str:
    """The PEFT key of one of our trainable parameters of a layer."""
    parts = split_name(name)
    if parts is None:
        return PEFT_PREFIX + layer_keys[name]
    module, kind, target = parts
    return peft_key(_target_module(layer_keys, module, target)[0], kind)


def merge(layer_keys: dict, base: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor],
          scaling: float, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One layer's base state with its adapters merged in (W[rows of t] += scaling * B_t A_t, in
    fp32, then cast to `dtype`, default the base's) and its modules_to_save replaced by their
    trained values. DoRA: W_t' = m_t / ||W_t + scaling B_t A_t||_row * (W_t + scaling B_t A_t), PEFT's merge."""
    cast = (lambda name: dtype or base[name].dtype)  # noqa: E731
    out = dict(base)
    for name, t in trainable.items():
        if split_name(name) is None:
            out[name] = t.to(cast(name))
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
        magnitude = trainable.get(f"{module}.{MAGNITUDE}.{target}")
        if magnitude is not None:
            w_t = w[offset:offset + rows]
            w[offset:offset + rows] = w_t * (magnitude.float() / torch.linalg.norm(w_t, dim=1))[:, None]
        out[key] = w
    return {k: v.to(cast(k)) if v.is_floating_point() else v for k, v in out.items()}


def peft_config(spec: LoraSpec, targets: list[str], base: str | None) -> dict:
    """adapter_config.json of an export (PEFT fills every field left out with its default). The
    targets are the short names adapted (a regex is written as given), layers_to_transform kept."""
    regex = isinstance(spec.target_modules, str) and spec.target_modules != ALL_LINEAR
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "target_modules": spec.target_modules if regex else sorted(targets),
            "layers_to_transform": None if spec.layers_to_transform is None else list(spec.layers_to_transform),
            "layers_pattern": None if spec.layers_pattern is None else list(spec.layers_pattern), "bias": "none",
            "modules_to_save": list(spec.modules_to_save) or None, "fan_in_fan_out": False,
            "base_model_name_or_path": base, "inference_mode": True, "init_lora_weights": spec.init_lora_weights,
            "use_rslora": spec.use_rslora, "use_dora": spec.use_dora}
