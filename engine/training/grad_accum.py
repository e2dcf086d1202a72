"""fp32 gradient accumulation fused into the weight-gradient GEMM (pipeline path, bf16).

bf16 pipeline runs accumulate gradients in fp32 through DeepSpeed's BF16_Optimizer (deepspeed_setup:
`grad_accum_dtype: fp32`, `immediate_grad_update`): a hook per parameter adds the bf16 `.grad` the
weight-gradient GEMM wrote into the parameter's fp32 gradient view, then frees it. With the fusion
on, the blocks' linears are models.fused_linear.WgradFusedLinear (swapped in at build,
models.pipeline.wgrad_fused_blocks) and `link` points each one's `weight.main_grad` at that same
fp32 view, so the GEMM adds into it directly (2.9% of an H200 step was the separate add,
bench/README.md). Everything downstream (data-parallel all-reduce, norm, clipping, step,
checkpoints) reads the fp32 buffers as before; norms, embeddings and head keep DeepSpeed's hook.
Mixtral's stacked experts (no nn.Linear) are fused too: their grouped weight-gradient GEMM adds into
the same views (models/grouped_wgrad.py: a Triton kernel on CUDA), no bf16 expert gradient, no hook.

The config key `wgrad_fusion` (default true) switches it: measured on one H200 (7B llama shape, one
pp=2 stage, seq 2048, micro 4) at 26,633 tok/s against 25,582 unfused (+4.1%), losses equal to
bf16 rounding. The default is the same on CPU (where the accumulate is an upcast fp32 matmul,
slower than the plain path) so that CPU runs and tests take the numerics a GPU run takes;
`wgrad_fusion: false` gives DeepSpeed's hook path back.
"""
from __future__ import annotations

import os

import torch

from engine.config import ConfigError, TrainConfig

OLD_ENV = "PPLLM_WGRAD_FUSION"  # the opt-in switch before the key: refused, so a left-over =0 is not ignored


def wgrad_fusion(cfg: TrainConfig) -> bool:
    """Whether a pipeline run fuses: `wgrad_fusion: true` (the default), bf16 with fp32 accumulation
    (the default), fp8 off (torchao's Float8Linear owns those linears)."""
    if OLD_ENV in os.environ:
        raise ConfigError(f"environment: {OLD_ENV}={os.environ[OLD_ENV]!r} is no longer read: the fusion is the "
                          "config key wgrad_fusion (default true; --set wgrad_fusion=false turns it off)")
    from engine.training.deepspeed_setup import resolved_fp8  # fp8: auto is off or tensorwise per machine

    return cfg.wgrad_fusion and cfg.dtype == "bf16" and cfg.bf16_grad_accum == "fp32" and resolved_fp8(cfg) == "off"


def link(engine) -> int:
    """Point every fused weight's `main_grad` (WgradFusedLinear weights, mixtral's stacked experts:
    models.fused_linear.fused_weights) at BF16_Optimizer's fp32 gradient view of that weight and keep DeepSpeed's bookkeeping true for it; returns how many were linked.

    DeepSpeed marks a parameter as having a gradient (`fp32_groups_has_gradients`, read when it
    picks the gradients for the norm and clipping) in its hook, which these weights never reach,
    and `clear_hp_grads` (after every step, on overflow, in zero_grad) resets the marks. So the
    marks are set again right after each reset: a fused weight's view always counts, and holds
    zeros until its backward runs, which adds nothing to the norm. The views stay valid: DeepSpeed
    zeroes and all-reduces the flat buffers in place (zero_, copy_)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from models.fused_linear import fused_weights

    opt = engine.optimizer
    if not isinstance(opt, BF16_Optimizer):
        raise RuntimeError(f"weight-gradient fusion needs DeepSpeed's BF16_Optimizer, got {type(opt).__name__}")
    where = {id(p): (i, j) for i, group in enumerate(opt.bf16_groups) for j, p in enumerate(group)}
    linked = []
    for weight in fused_weights(engine.module):  # block linears and mixtral's stacked experts
        if id(weight) in where:  # a frozen weight stays plain
            i, j = where[id(weight)]
            hp_grad = opt.fp32_groups_gradients[i][j]
            assert hp_grad.dtype == torch.float32 and hp_grad.numel() == weight.numel()
            weight.main_grad = hp_grad.view(weight.shape)
            weight._hp_grad = hp_grad  # as DeepSpeed's hook sets it (tied-weight all-reduce reads it)
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
