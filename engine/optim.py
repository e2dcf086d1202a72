"""Client optimizers built from the YAML `optimizer` block.

We build torch optimizers ourselves rather than letting DeepSpeed build its fused ones: no
JIT compile on CPU, identical behaviour under pipeline and ZeRO, and Lion without a custom op.
"""
from __future__ import annotations

import torch

from .config import ConfigError


def param_groups(params, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases (1-D) are not decayed."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(spec: dict | None, params) -> torch.optim.Optimizer:
    spec = spec or {"type": "AdamW", "params": {"lr": 1e-5}}
    kind, kw = spec.get("type", "AdamW"), dict(spec.get("params") or {})
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    groups = param_groups(params, float(kw.pop("weight_decay", 0.0)))
    try:
        if kind in ("AdamW", "Adam"):
            kw.pop("torch_adam", None), kw.pop("adam_w_mode", None)
            if torch.cuda.is_available():
                kw.setdefault("fused", True)
            return torch.optim.AdamW(groups, **kw)
        if kind == "Lion":
            from lion_pytorch import Lion

            return Lion(groups, **kw)
    except TypeError as e:
        raise ConfigError(f"optimizer.params: {e}") from None
    raise ConfigError(f"optimizer.type {kind!r} is not supported (AdamW, Adam, Lion)")
