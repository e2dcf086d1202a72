"""fp32 gradient accumulation fused into the weight-gradient GEMM (pipeline path, bf16).

bf16 pipeline runs accumulate gradients in fp32 through DeepSpeed's BF16_Optimizer (deepspeed_setup:
`grad_accum_dtype: fp32`, `immediate_grad_update`): a hook per parameter adds the bf16 `.grad` the
weight-gradient GEMM wrote into the parameter's fp32 gradient view, then frees it. With the fusion
on, the blocks' linears are models.fused_linear.WgradFusedLinear (swapped in at build,
models.pipeline.wgrad_fused_blocks) and `link` points each one's `weight.main_grad` at that same
fp32 view, so the GEMM adds into it directly (2.9% of an H200 step was the separate add,
bench/README.md). Everything downstream (data-parallel all-reduce, norm, clipping, step,
checkpoints) reads the fp32 buffers as before; norms, embeddings and head keep DeepSpeed's hook.

PPLLM_WGRAD_FUSION=1 turns it on, =0 or unset leaves it off: it is tested on CPU (bitwise resume,
pp/dp reshape, compiled == eager) but has not yet run on a GPU, so it stays opt-in until a device
call has measured it (bench/README.md has the command).
"""
from __future__ import annotations

import os

import torch

from engine.config import ConfigError, TrainConfig

ENV = "PPLLM_WGRAD_FUSION"


def wgrad_fusion(cfg: TrainConfig) -> bool:
    """Whether a pipeline run fuses: bf16 with fp32 accumulation (the default), fp8 off (torchao's
    Float8Linear owns those linears), and the switch on (opt-in; on CPU the accumulate is an
    upcast fp32 matmul, slower than the plain path)."""
    env = os.environ.get(ENV, "")
    if env not in ("", "0", "1"):
        raise ConfigError(f"environment: {ENV}={env!r}: expected 0 (off) or 1 (on)")
    if env == "0" or cfg.dtype != "bf16" or cfg.bf16_grad_accum != "fp32" or cfg.fp8 != "off":
        return False
    return env == "1"


def link(engine) -> int:
    """Point every WgradFusedLinear's `weight.main_grad` at BF16_Optimizer's fp32 gradient view of
    that weight and keep DeepSpeed's bookkeeping true for it; returns how many were linked.

    DeepSpeed marks a parameter as having a gradient (`fp32_groups_has_gradients`, read when it
    picks the gradients for the norm and clipping) in its hook, which these weights never reach,
    and `clear_hp_grads` (after every step, on overflow, in zero_grad) resets the marks. So the
    marks are set again right after each reset: a fused weight's view always counts, and holds
    zeros until its backward runs, which adds nothing to the norm. The views stay valid: DeepSpeed
    zeroes and all-reduces the flat buffers in place (zero_, copy_)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from models.fused_linear import WgradFusedLinear

    opt = engine.optimizer
    if not isinstance(opt, BF16_Optimizer):
        raise RuntimeError(f"weight-gradient fusion needs DeepSpeed's BF16_Optimizer, got {type(opt).__name__}")
    where = {id(p): (i, j) for i, group in enumerate(opt.bf16_groups) for j, p in enumerate(group)}
    linked = []
    for m in engine.module.modules():
        if isinstance(m, WgradFusedLinear) and id(m.weight) in where:  # a frozen weight stays plain
            i, j = where[id(m.weight)]
            hp_grad = opt.fp32_groups_gradients[i][j]
            assert hp_grad.dtype == torch.float32 and hp_grad.numel() == m.weight.numel()
            m.weight.main_grad = hp_grad.view(m.weight.shape)
            m.weight._hp_grad = hp_grad  # as DeepSpeed's hook sets it (tied-weight all-reduce reads it)
            linked.append((i, j))

    def mark():
        for i, j in linked:
            opt.fp32_groups_has_gradients[i][j] = True

    clear_hp_grads = opt.clear_hp_grads

    def clear_and_mark():
        clear_hp_grads()
        mark()

    opt.clear_hp_grads = clear_and_mark
    mark()
    return len(linked)
