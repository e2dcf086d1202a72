"""A linear whose weight gradient is added, in fp32, straight into `weight.main_grad`.

With fp32 gradient accumulation the usual backward writes each weight gradient in bf16, and a
separate kernel then reads it and adds it into the fp32 buffer the optimizer steps from (~10 extra
bytes per parameter per micro-batch). Here the weight-gradient GEMM itself accumulates into the
fp32 buffer (cuBLAS with an fp32 C and beta = 1), as Megatron's `gradient_accumulation_fusion`
does; it is also more exact, since no micro-batch's gradient is rounded to bf16.

Mixtral's stacked experts (no nn.Linear) join through `WGRAD_PARAMS`: their grouped GEMMs' weight
gradient accumulates the same way (models/grouped_wgrad.py).

`main_grad` is an fp32 tensor of the weight's shape that the owner of the buffer attaches
(engine/training/grad_accum.py points it at DeepSpeed's fp32 gradient views). A WgradFusedLinear
whose weight has no `main_grad` is a plain nn.Linear. The weight then gets no `.grad` from
backward: whoever attached `main_grad` reads the gradient there. Bias gradients (a vector per
linear, negligible traffic) take the normal path.

The accumulate is a `torch.library.custom_op` that mutates `main_grad`, so torch.compile keeps it
opaque and functionalizes it correctly: the blocks are compiled (models/block_base.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.library.custom_op("ppllm::wgrad_accumulate", mutates_args=("main_grad",))
def wgrad_accumulate(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad += grad_out^T @ x, in fp32 (grad_out [tokens, out], x [tokens, in])."""
    if main_grad.is_cuda and grad_out.dtype in (torch.bfloat16, torch.float16):
        # bf16 operands, fp32 C read and written by the GEMM (torch >= 2.8 on CUDA)
        torch.addmm(main_grad, grad_out.t(), x, out_dtype=torch.float32, out=main_grad)
    else:  # CPU has no mixed-dtype addmm: upcast the operands (same exact products, fp32 sum)
        main_grad.addmm_(grad_out.t().float(), x.float())


@wgrad_accumulate.register_fake
def _(main_grad, grad_out, x) -> None:
    return None


class _Linear(torch.autograd.Function):
    """F.linear forward; backward: input and bias gradients as usual, the weight's accumulated into
    `main_grad` and returned as None. `main_grad` is held on ctx, not saved for backward: under a
    pipeline schedule other micro-batches' backwards add into it between this forward and its
    backward, which a saved tensor's version check would refuse."""

    @staticmethod
    def forward(x, weight, bias, main_grad):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, main_grad = inputs
        ctx.save_for_backward(x, weight)
        ctx.main_grad = main_grad
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        wgrad_accumulate(ctx.main_grad, g2, x.reshape(-1, x.shape[-1]))
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


class WgradFusedLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) with the fused weight-gradient accumulation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main_grad = getattr(self.weight, "main_grad", None)
        if main_grad is None or not self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _Linear.apply(x, self.weight, self.bias, main_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "WgradFusedLinear":
        """The same module re-classed: parameters, hooks and attributes stay the very same objects."""
        linear.__class__ = cls
        return linear


def fuse_wgrad(module: nn.Module) -> list[nn.Parameter]:
    """Make every plain nn.Linear under `module` a WgradFusedLinear and mark every module that
    declares `WGRAD_PARAMS` (mixtral's stacked experts, whose grouped GEMMs accumulate through
    models/grouped_wgrad.py) as fused; returns their weights (the parameters whose `main_grad` the
    caller attaches), as `fused_weights` finds them again."""
    for m in module.modules():
        if type(m) is nn.Linear:
            WgradFusedLinear.from_linear(m)
        elif getattr(m, "WGRAD_PARAMS", None):
            m.wgrad_fused = True
    return fused_weights(module)


def fused_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights under `module` whose gradient goes into `main_grad` once one is attached:
    WgradFusedLinear weights and the `WGRAD_PARAMS` of modules fuse_wgrad marked."""
    weights = []
    for m in module.modules():
        if isinstance(m, WgradFusedLinear):
            weights.append(m.weight)
        elif getattr(m, "wgrad_fused", False):
            weights.extend(getattr(m, name) for name in m.WGRAD_PARAMS)
    return weights
