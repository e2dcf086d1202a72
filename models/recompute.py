"""Compile and activation-recompute policy of a block: which recompute modes exist, which ops
selective recompute keeps, and how `BlockBase.run_block` wraps and compiles the block.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint

from .offload import offloaded

CKPT_MODES = ("none", "full", "selective")
# Ops whose outputs selective checkpointing keeps: the expensive ones. Everything else in a block
# (norms, rotary, activations, residual adds) is recomputed from them in backward.
_SAVED_OPS = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_efficient_attention", "_flash_attention_forward", "_efficient_attention_forward")


def resolve_ckpt_mode(grad_ckpt: bool | str) -> str:
    """`use_grad_ckpt` as one of CKPT_MODES: False/"none", True/"full" (whole block), "selective"."""
    mode = {True: "full", False: "none"}.get(grad_ckpt, grad_ckpt)
    if mode not in CKPT_MODES:
        raise ValueError(f"use_grad_ckpt must be one of true, false, {', '.join(CKPT_MODES)}; got {grad_ckpt!r}")
    return mode


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {getattr(torch.ops.aten, name).default for name in _SAVED_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpointed(fn: Callable, mode: str, *args, offload: bool = False):
    """fn(*args), its activations recomputed in backward: non-reentrant (works under DeepSpeed's
    pipeline without `checkpointable_layers`); "selective" keeps the _SAVED_OPS outputs.
    offload: the inputs it keeps for the recompute wait in CPU memory (models/offload.py)."""
    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    with offloaded(offload):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **extra)


def compile_fixed(fn: Callable) -> Callable:
    """`fn` compiled for fixed shapes (one graph per block; no recompiles per step)."""
    return torch.compile(fn, dynamic=False)
