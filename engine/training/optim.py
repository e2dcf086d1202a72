"""Client optimizers built from the YAML `optimizer` block.

We build torch optimizers ourselves rather than letting DeepSpeed build its fused ones: no
JIT compile on CPU, identical behaviour under pipeline and ZeRO, and Lion without a custom op.
"""
from __future__ import annotations

import re

import torch

from engine import distributed as D
from engine.config import ConfigError


def param_groups(params, weight_decay: float, no_wd_kws: list[str] | None = None) -> list[dict]:
    """Decay matrices only; norms and biases (1-D) are not decayed.

    `params`: parameters, or (name, parameter) pairs. With `no_wd_kws` (gdGPT's optimizer key, a
    list of regular expressions) and names, the rule is gdGPT's instead: a parameter whose name
    matches one of them (re.search, e.g. 'bias', '[a-zA-Z]*norm') is not decayed, every other is.
    """
    named = [item if isinstance(item, tuple) else ("", item) for item in params]
    named = [(n, p) for n, p in named if p.requires_grad]
    if no_wd_kws:
        if any(not n for n, _ in named):
            raise ValueError("no_wd_kws needs parameter names (pass named_parameters())")
        keep = [not any(re.search(k, n) for k in no_wd_kws) for n, _ in named]
    else:
        keep = [len(getattr(p, "ds_shape", p.shape)) >= 2 for _, p in named]  # ZeRO-3: p is a 1-D placeholder
    return [{"params": [p for (_, p), k in zip(named, keep) if k], "weight_decay": weight_decay},
            {"params": [p for (_, p), k in zip(named, keep) if not k], "weight_decay": 0.0}]


def uses_ds_cpu_optimizer(ds: dict) -> bool:
    """ZeRO-Offload of the optimizer without `zero_force_ds_cpu_optimizer: false`: DeepSpeed then
    requires its own CPU Adam/Lion (vectorised C++; JIT-compiled on first use, ~1 min)."""
    zero = ds.get("zero_optimization", {})
    offloaded = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    return zero.get("stage", 0) > 0 and offloaded and ds.get("zero_force_ds_cpu_optimizer", True)


def optimizer_param_names(spec: dict | None, ds: dict | None = None) -> set[str] | None:
    """The `optimizer.params` keys build_optimizer can pass for `spec` (read off the signature of the
    class it picks), so a typo is caught before launch; None for a type it does not build."""
    import inspect

    kind = (spec or {}).get("type", "AdamW")
    if ds is not None and uses_ds_cpu_optimizer(ds):
        if kind == "Lion":
            from deepspeed.ops.lion import DeepSpeedCPULion as cls
            dropped, fixed = (), ()
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam as cls
            dropped, fixed = ("torch_adam", "fused", "adam_w_mode"), ("adamw_mode",)
    elif kind in ("AdamW", "Adam"):
        cls, dropped, fixed = torch.optim.AdamW, ("torch_adam", "adam_w_mode"), ()
    elif kind == "Lion":
        from lion_pytorch import Lion as cls
        dropped, fixed = (), ()
    else:
        return None
    return (set(inspect.signature(cls).parameters) - {"params", "model_params", *fixed}) | set(dropped)


def build_optimizer(spec: dict | None, params, ds: dict | None = None) -> torch.optim.Optimizer:
    """The client optimizer; `ds` (the DeepSpeed config) picks DeepSpeed's CPU optimizers under
    ZeRO-Offload (see uses_ds_cpu_optimizer)."""
    spec = spec or {"type": "AdamW", "params": {"lr": 1e-5}}
    kind, kw = spec.get("type", "AdamW"), dict(spec.get("params") or {})
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    groups = param_groups(params, float(kw.pop("weight_decay", 0.0)), spec.get("no_wd_kws"))
    try:
        if ds is not None and uses_ds_cpu_optimizer(ds):
            if kind == "Lion":
                from deepspeed.ops.lion import DeepSpeedCPULion

                return DeepSpeedCPULion(groups, **kw)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            kw.pop("torch_adam", None), kw.pop("fused", None)
            adamw = kw.pop("adam_w_mode", True) or kind == "AdamW"  # DeepSpeed's Adam is AdamW by default
            return DeepSpeedCPUAdam(groups, adamw_mode=adamw, **kw)
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


class GlobalGradClip:
    """Gradient norm (and clipping) over the whole pipeline, for plain fp32 optimizers.

    DeepSpeed's fp32 path (no bf16/fp16/ZeRO wrapper) clips with a norm that counts only the
    first stage's gradients under pipeline parallelism and records no norm; its bf16 and ZeRO
    wrappers do it right. Here, around the client optimizer's step: sum squares over this stage
    (tied twins counted once), all-reduce over the stages, clip, remember the norm. A non-finite
    norm skips the update the way DeepSpeed's wrappers do (`optimizer.overflow = True`: the engine
    then skips the LR step and `engine.was_step_applied()` is False); every rank sees the same norm.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module, max_norm: float, group):
        self.module, self.max_norm, self.group = module, max_norm, group
        self.norm: float | None = None
        self.optimizer, self._step = optimizer, optimizer.step
        optimizer.overflow = False
        optimizer.step = self.step  # our own optimizer object (built in build_optimizer), not a library's

    def step(self, *args, **kwargs):
        import math

        self._clip()
        self.optimizer.overflow = not math.isfinite(self.norm)
        if self.optimizer.overflow:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        return self._step(*args, **kwargs)

    def _clip(self):
        import torch.distributed as dist

        grads = [p.grad for p in self.module.parameters()
                 if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
        sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else D.comm_tensor(0.0)
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt()
        self.norm = float(norm)
        if self.max_norm > 0 and self.norm > self.max_norm:
            coef = self.max_norm / (norm + 1e-6)
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
