"""The training state of a checkpoint tag: one copy of each thing, per layer, topology-free.

    layer_XX-model_states.pt  {"<param>": fp32 master weight, "<buffer>": tensor} per pipeline layer
    optim/layer_XX.pt         {"<param>": {"exp_avg": tensor, ...}}: the optimizer state of those params
    optim/common.pt           step, LR scheduler, param groups (lr, betas, ...), engine counters

The layer files are the weights pp_to_hg, demo and initial loads read (tensors by param name, as
DeepSpeed's pipeline writes them), and they hold the fp32 master: a bf16 run's bf16 weights are
that master rounded, exactly what DeepSpeed's optimizers copy into the model after each step, so
they are derived at load instead of stored twice. DeepSpeed's own files (mp_rank_* model states,
per-rank optimizer partitions) repeated both, 24 B/param for fp32 AdamW; this is 12.

The same files serve both training paths and any layout: every layer is written whole by one
data-parallel rank of the stage that holds it (files spread round-robin over those ranks), with
ZeRO / bf16 partitions assembled through DeepSpeed's public tensor-fragment API
(deepspeed.utils.safe_get_full_*), and read back through the matching safe_set_full_* calls. So a
tag resumes on the layout that wrote it (bitwise) and on another pp x dp, `parts`, ZeRO stage or
precision. Tags of the previous format (format 1: DeepSpeed's files + an optim/ copy holding the
fp32 master as well) load through the same path.
"""
from __future__ import annotations

import re
import reprlib
from pathlib import Path

import torch

from engine import distributed as D
from engine.checkpoints import integrity
from engine.checkpoints.files import LayoutError, check_tensor_dict, layer_file, load_layer
from models.keymap import unfused_names
from models.lora import has_lora

FORMAT = 2
DIR = "optim"
COMMON = "common.pt"
_NAME = re.compile(r"(?:(\d+)|tied_modules\.([^.]+))\.(.+)")


def _zero_opt(engine):
    """The DeepSpeed optimizer wrapper holding fp32 partitions, or None (plain fp32: client optimizer)."""
    opt = engine.optimizer
    return opt if any(hasattr(opt, a) for a in ("bit16_groups", "bf16_groups", "fp32_partitioned_groups_flat")) else None


def _inner(engine):
    zopt = _zero_opt(engine)
    return zopt.optimizer if zopt is not None else engine.optimizer


def _state_keys(engine) -> list[str]:
    for st in _inner(engine).state.values():
        return sorted(k for k, v in st.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0)
    return []


def _step(engine) -> tuple[float | None, str | None]:
    """The optimizer's step count and its Python type (torch: tensor; DeepSpeed's CPU Adam: int)."""
    for st in _inner(engine).state.values():
        step = st.get("step")
        if step is None:
            return None, None
        return float(step), "tensor" if torch.is_tensor(step) else type(step).__name__
    return None, None


def _groups(zopt):
    """(low-precision param groups, fp32 flat partitions the inner optimizer steps)."""
    if hasattr(zopt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return zopt.fp16_groups, zopt.fp32_partitioned_groups_flat
    lp = getattr(zopt, "bit16_groups", None) or zopt.bf16_groups
    hp = getattr(zopt, "single_partition_of_fp32_groups", None) or zopt.fp32_groups_flat_partition
    return lp, hp


def _link(zopt) -> None:
    """Point every parameter's fragment view at the current optimizer state (ZeRO-1/2 and bf16
    link lazily after a step and unlink on load; idempotent; ZeRO-3 looks state up by position)."""
    if hasattr(zopt, "fp32_partitioned_groups_flat"):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    lp, hp = _groups(zopt)
    for i, flat in enumerate(hp):
        if flat in zopt.optimizer.state:
            lazy_init_hp_params_optimizer_state(lp[i], flat, zopt.optimizer.state)


def _layers(module) -> list[tuple[int, torch.nn.Module]]:
    """(global layer index, module) of each layer this rank holds a layer file for: a pipeline
    stage's modules (a tied twin that borrows its owner's module has none, as in DeepSpeed's own
    layer files), or every owned layer of the whole model (ZeRO: SequentialModel)."""
    if hasattr(module, "forward_funcs"):
        return [(module._local_start + i, f) for i, f in enumerate(module.forward_funcs)
                if isinstance(f, torch.nn.Module)]
    return module.owned_layers()


def _dp(engine) -> tuple[int, int]:
    grid = getattr(engine, "grid", None)
    if grid is not None:
        return grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
    return D.rank(), D.world_size()


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its bytes (torch.save writes a view's whole storage)."""
    t = t.detach()
    if t.device.type != "cpu":
        return t.cpu()
    if t.storage_offset() or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def save(engine, tag_dir: Path) -> dict[str, list]:
    """Write this rank's share of the tag's layer files and optim/ (call on every rank: ZeRO
    fragments are gathered collectively, layer by layer). Returns {relative path: [size, hash,
    elements]} of the files this rank wrote."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    zopt, inner, keys = _zero_opt(engine), _inner(engine), _state_keys(engine)
    if zopt is None and isinstance(engine.optimizer, DeepSpeedOptimizer):  # e.g. stage 0's FP16_Optimizer
        raise NotImplementedError(f"{type(engine.optimizer).__name__}: no fp32 master access for checkpoints "
                                  f"(TrainConfig.zero_stage runs bf16/fp16 at ZeRO-1 for this)")
    dp_rank, dp_size = _dp(engine)
    if zopt is not None:
        _link(zopt)
    written: dict[str, list] = {}
    (tag_dir / DIR).mkdir(parents=True, exist_ok=True)
    adapters_only = has_lora(engine.module)  # LoRA: the frozen base stays where model_path has it
    for n, (idx, layer) in enumerate(_layers(engine.module)):
        if adapters_only and not any(p.requires_grad for p in layer.parameters()):
            continue
        writer = n % dp_size == dp_rank
        masters, moments = {}, {}
        for name, p in layer.named_parameters():
            if adapters_only and not p.requires_grad:
                continue
            if zopt is not None and p.requires_grad:
                master = safe_get_full_fp32_param(p)
                state = {k: safe_get_full_optimizer_state(p, k) for k in keys}
            else:
                master = p
                state = {k: v for k, v in inner.state.get(p, {}).items() if k in keys}
            if writer:
                masters[id(p)] = _compact(master)
                moments[name] = {k: _compact(v) for k, v in state.items() if v is not None}
        if not writer:
            continue
        weights = {k: masters[id(v)] if id(v) in masters else _compact(v)
                   for k, v in layer.state_dict(keep_vars=True).items()
                   if not adapters_only or isinstance(v, torch.nn.Parameter) and v.requires_grad}
        path = layer_file(tag_dir, idx)
        written[path.name] = [*integrity.save(weights, path), sum(t.numel() for t in masters.values())]
        if any(moments.values()):
            rel = f"{DIR}/layer_{idx:02d}.pt"
            written[rel] = [*integrity.save(moments, tag_dir / rel), 0]
    if D.rank() == 0:
        sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        step, step_type = _step(engine)
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        common = {"format": FORMAT, "step": step, "step_type": step_type, "lr_scheduler": sched,
                  "param_groups": groups, "global_steps": engine.global_steps,
                  "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps,
                  "loss_scaler": {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))}
                  if scaler is not None else None}
        written[f"{DIR}/{COMMON}"] = [*integrity.save(common, tag_dir / DIR / COMMON), 0]
    return written


def _tied_owners(module) -> dict[str, int]:
    """Tied key -> the layer whose file holds the tied weights (its first plain-module use)."""
    from deepspeed.pipe import TiedLayerSpec

    owners: dict[str, int] = {}
    for i, spec in enumerate(getattr(module, "_layer_specs", [])):
        if isinstance(spec, TiedLayerSpec) and spec.forward_fn is None:
            owners.setdefault(spec.key, i)
    return owners


COMMON_KEYS = ("step", "param_groups", "lr_scheduler", "global_steps", "global_samples", "skipped_steps")


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise LayoutError(f"{path}: optimizer state file missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged, or not a weights-only file (a pickled object is refused, not run)
        raise LayoutError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict):
        check_tensor_dict(path, state, "states by parameter name", "an optimizer state file")  # raises
    if path.name == COMMON:  # what `save` writes there (read by key in `load`)
        missing = [k for k in COMMON_KEYS if k not in state]
        if missing:
            raise LayoutError(f"{path}: no '{missing[0]}' — not an optimizer state file")
        if not isinstance(state["param_groups"], list) or not all(isinstance(g, dict) for g in state["param_groups"]):
            raise LayoutError(f"{path}: 'param_groups' is not a list of dicts — not an optimizer state file")
        return state
    for name, entry in state.items():  # a layer's {param: {exp_avg: tensor, ...}}
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise LayoutError(f"{path}: entry {reprlib.repr(name)} is not a parameter's state ({type(entry).__name__} "
                              f"under a {type(name).__name__} key) — not an optimizer state file")
        check_tensor_dict(path, entry, f"optimizer state tensors of '{name}'", "an optimizer state file")
    return state


class _Source:
    """Per parameter name: its fp32 master and optimizer state from a tag (one file of each kind
    held at a time)."""

    def __init__(self, tag_dir: Path, module, fmt: int):
        self.tag_dir, self.fmt, self.owners = tag_dir, fmt, _tied_owners(module)
        self.unfused = unfused_names(module)
        self.cache: dict[Path, dict] = {}

    def _get(self, path: Path, weights: bool = False) -> dict:
        if path not in self.cache:
            if len(self.cache) >= 2:  # layers come in order: keep memory at about two files
                self.cache.pop(next(iter(self.cache)))
            self.cache[path] = load_layer(path) if weights else _load_file(path)
        return self.cache[path]

    def where(self, name: str) -> tuple[int | str, str]:
        m = _NAME.fullmatch(name)
        if not m:
            raise LayoutError(f"parameter {name!r}: not a pipeline layer parameter")
        if m.group(1):
            return int(m.group(1)), m.group(3)
        if self.fmt >= FORMAT:
            if m.group(2) not in self.owners:
                raise LayoutError(f"tied module {m.group(2)!r}: no layer holds its weights")
            return self.owners[m.group(2)], m.group(3)
        return m.group(2), m.group(3)

    def _optim_path(self, where: int | str) -> Path:
        name = f"layer_{where:02d}.pt" if isinstance(where, int) else f"tied_{where}.pt"
        return self.tag_dir / DIR / name

    def master(self, name: str) -> torch.Tensor:
        where, key = self.where(name)
        if self.fmt >= FORMAT:
            path = layer_file(self.tag_dir, where)
            state = self._get(path, weights=True)
            if key not in state and name in self.unfused:  # written before the fusion / the expert stacking
                parts = [state.get(self.where(old)[1]) for old in self.unfused[name]]
                if all(part is not None for part in parts):  # flat: the caller reshapes to the parameter's shape
                    return torch.cat([part.reshape(-1) for part in parts])
            if key not in state:
                raise LayoutError(f"{path}: no weights for '{key}'")
            return state[key]
        return self.state(name)["fp32"]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        where, key = self.where(name)
        path = self._optim_path(where)
        if self.fmt >= FORMAT and not path.is_file():
            return {}  # a layer without optimizer state (e.g. never stepped)
        entries = self._get(path)
        if key not in entries and name in self.unfused:  # written before q/k/v, gate/up, experts were fused
            parts = [entries.get(self.where(old)[1]) for old in self.unfused[name]]
            if all(parts):
                entries[key] = {k: torch.cat([part[k].reshape(-1) for part in parts]) for k in parts[0]}
        if key not in entries:
            raise LayoutError(f"{path}: no optimizer state for '{key}'")
        return entries[key]


def has_state(tag_dir: Path) -> bool:
    return (tag_dir / DIR / COMMON).is_file()


def load(engine, tag_dir: Path) -> None:
    """Set this rank's optimizer state and fp32 masters from the tag (every rank). The model's
    weights were loaded from the tag's layer files before the engine was built."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    src = tag_dir / DIR
    if not has_state(tag_dir):
        raise LayoutError(f"{tag_dir}: saved on another pp x dp layout and has no topology-free optimizer state "
                          f"({DIR}/{COMMON}); resume it on the layout that wrote it")
    common = _load_file(src / COMMON)
    source = _Source(tag_dir, engine.module, int(common.get("format", 1)))
    zopt, inner = _zero_opt(engine), _inner(engine)
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    step, step_type = common["step"], common.get("step_type", "tensor")
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}

    def step_value(like):
        if step_type == "int":
            return int(step)
        if step_type == "float":
            return float(step)
        g = group_of.get(id(like), {})  # torch keeps it on the device for fused / capturable optimizers
        device = like.device if g.get("fused") or g.get("capturable") else "cpu"
        return torch.tensor(step, dtype=torch.float32, device=device)

    if zopt is None:
        keys = None
        for name, p in params:
            st = {k: v.to(p.device, p.dtype).reshape(p.shape).clone() for k, v in source.state(name).items()
                  if k != "fp32"}
            if keys is None:
                keys = set(st)
            if step is not None:
                st["step"] = step_value(p)
            inner.state[p] = st
    else:
        first = params[0][0] if params else None
        keys = sorted(k for k in (source.state(first) if first else {}) if k != "fp32")
        for flat in _groups(zopt)[1]:  # ZeRO creates optimizer state lazily: make it, then link
            st = {k: torch.zeros_like(flat) for k in keys}
            if step is not None:
                st["step"] = step_value(flat)
            inner.state[flat] = st
        _link(zopt)
        for name, p in params:
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3: p itself is an empty partition placeholder
            safe_set_full_fp32_param(p, source.master(name).to(p.device, torch.float32).reshape(shape))
            state = source.state(name)
            for k in keys:
                safe_set_full_optimizer_state(p, state[k].to(p.device).reshape(shape), k)
    for group, saved in zip(inner.param_groups, common["param_groups"]):  # the current lr lives here
        group.update(saved)
    if engine.lr_scheduler is not None and common["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
    engine.global_steps, engine.global_samples = common["global_steps"], common["global_samples"]
    engine.skipped_steps = common["skipped_steps"]
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for k, v in (common.get("loss_scaler") or {}).items():
        if scaler is not None and hasattr(scaler, k):
            setattr(scaler, k, v)
