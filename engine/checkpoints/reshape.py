"""Topology-free optimizer state, so a checkpoint resumes on another pp x dp layout or `parts`.

DeepSpeed's own optimizer files are per (stage, dp rank) and only load on the layout that wrote
them. Its universal checkpoint (ds_to_universal --inject_missing_state, then `load_universal`)
does reshape pipeline + ZeRO-1 here (tests/test_checkpoint.py checks we continue identically),
but it needs ZeRO optimizer files, so it cannot cover the plain fp32 pipeline path (stage 0, our
default), and it is an offline conversion step. So every tag also gets `<tag>/optim/`:

    optim/layer_XX.pt        {"<param>": {"fp32": master, "<state key>": tensor, ...}} per pipeline layer
    optim/tied_<key>.pt      the same for a tied module (embedding shared with the head)
    optim/common.pt          {"step", "lr_scheduler", "param_groups" (lr, betas, ...), "global_steps", ...}

written by data-parallel rank 0 of the stage that owns the layer, with ZeRO-1 / bf16 partitions
assembled through DeepSpeed's public tensor-fragment API (deepspeed.utils.safe_get_full_*).
On a layout change the weights come from the tag's layer files and the optimizer state from here.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from engine import distributed as D
from engine.checkpoints.files import LayoutError

DIR = "optim"
COMMON = "common.pt"
_NAME = re.compile(r"(?:(\d+)|tied_modules\.([^.]+))\.(.+)")


def _file_and_key(name: str) -> tuple[str, str]:
    """PipelineModule parameter name -> (file in optim/, key inside it). Layer indices are global."""
    m = _NAME.fullmatch(name)
    if not m:
        raise LayoutError(f"parameter {name!r}: not a pipeline layer parameter")
    return (f"layer_{int(m.group(1)):02d}.pt" if m.group(1) else f"tied_{m.group(2)}.pt"), m.group(3)


def _zero_opt(engine):
    """The DeepSpeed optimizer wrapper holding fp32 partitions, or None (plain fp32: client optimizer)."""
    opt = engine.optimizer
    return opt if hasattr(opt, "bit16_groups") or hasattr(opt, "bf16_groups") else None


def _inner(engine):
    zopt = _zero_opt(engine)
    return zopt.optimizer if zopt is not None else engine.optimizer


def _state_keys(engine) -> list[str]:
    for st in _inner(engine).state.values():
        return sorted(k for k, v in st.items() if k != "step" and torch.is_tensor(v))
    return []


def _step_value(engine):
    for st in _inner(engine).state.values():
        step = st.get("step")
        return float(step) if step is not None else None
    return None


def _groups(zopt):
    lp = getattr(zopt, "bit16_groups", None) or zopt.bf16_groups
    hp = getattr(zopt, "single_partition_of_fp32_groups", None) or zopt.fp32_groups_flat_partition
    return lp, hp


def _link(zopt) -> None:
    """Point every parameter's fragment view at the current optimizer state (DeepSpeed links
    lazily after a step and unlinks on load; idempotent)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    lp, hp = _groups(zopt)
    for i, flat in enumerate(hp):
        if flat in zopt.optimizer.state:
            lazy_init_hp_params_optimizer_state(lp[i], flat, zopt.optimizer.state)


def save(engine, tag_dir: Path) -> None:
    """Write optim/ into tag_dir (call on every rank: ZeRO fragments are gathered collectively)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module, grid = engine.module, engine.grid
    writer = grid.get_data_parallel_rank() == 0
    zero, keys = _zero_opt(engine) is not None, _state_keys(engine)
    inner = _inner(engine)
    if zero:
        _link(_zero_opt(engine))
    files: dict[str, dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if zero:
            entry = {"fp32": safe_get_full_fp32_param(p)}
            for k in keys:
                entry[k] = safe_get_full_optimizer_state(p, k)
        else:
            st = inner.state.get(p, {})
            entry = {"fp32": p.detach()}
            entry.update({k: v for k, v in st.items() if k != "step" and torch.is_tensor(v)})
        if writer:
            fname, key = _file_and_key(name)
            files.setdefault(fname, {})[key] = {k: v.detach().float().cpu().clone() for k, v in entry.items()
                                                if v is not None}
    out = tag_dir / DIR
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for fname, state in files.items():
            if fname.startswith("tied_") and not _writes_tied(module, fname):
                continue
            torch.save(state, out / fname)
    if D.rank() == 0:
        sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        torch.save({"step": _step_value(engine), "lr_scheduler": sched, "param_groups": groups, "global_steps": engine.global_steps,
                    "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps},
                   out / COMMON)


def _writes_tied(module, fname: str) -> bool:
    """A tied module lives on several stages (identical copies): the first one writes it."""
    comms = module.tied_comms.get(fname[len("tied_"):-len(".pt")])
    return comms is None or D.rank() == comms["ranks"][0]


def load(engine, tag_dir: Path) -> None:
    """Set this rank's optimizer state (and fp32 masters) from tag_dir/optim (every rank)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    src = tag_dir / DIR
    if not (src / COMMON).is_file():
        raise LayoutError(f"{tag_dir}: saved on another pp x dp layout and has no topology-free optimizer state "
                          f"({DIR}/{COMMON}); resume it on the layout that wrote it")
    common = torch.load(src / COMMON, map_location="cpu", weights_only=True)
    cache: dict[str, dict] = {}

    def entry(name):
        fname, key = _file_and_key(name)
        if fname not in cache:
            if not (src / fname).is_file():
                raise LayoutError(f"{src / fname}: optimizer state file missing")
            try:
                cache[fname] = torch.load(src / fname, map_location="cpu", weights_only=True)
            except Exception as e:
                raise LayoutError(f"{src / fname}: cannot be read ({type(e).__name__})") from None
        if key not in cache[fname]:
            raise LayoutError(f"{src / fname}: no optimizer state for '{key}'")
        return cache[fname][key]

    zopt, inner = _zero_opt(engine), _inner(engine)
    step = common["step"]
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    keys = sorted({k for n, _ in params for k in entry(n) if k != "fp32"})

    def step_tensor(like):
        return torch.tensor(step, dtype=torch.float32) if step is not None else None

    if zopt is None:
        for name, p in params:
            e = entry(name)
            st = {k: e[k].to(p.device, p.dtype).reshape(p.shape).clone() for k in keys}
            if step is not None:
                st["step"] = step_tensor(p)
            inner.state[p] = st
    else:
        for flat in _groups(zopt)[1]:  # ZeRO creates optimizer state lazily: make it, then link
            st = {k: torch.zeros_like(flat) for k in keys}
            if step is not None:
                st["step"] = step_tensor(flat)
            inner.state[flat] = st
        _link(zopt)
        for name, p in params:
            e = entry(name)
            safe_set_full_fp32_param(p, e["fp32"].to(p.device).reshape(p.shape))
            for k in keys:
                safe_set_full_optimizer_state(p, e[k].to(p.device).reshape(p.shape), k)
    for group, saved in zip(inner.param_groups, common["param_groups"]):  # the current lr lives here
        group.update(saved)
    if engine.lr_scheduler is not None and common["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
    engine.global_steps, engine.global_samples = common["global_steps"], common["global_samples"]
    engine.skipped_steps = common["skipped_steps"]
