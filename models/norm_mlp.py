"""The shared feed-forward pieces: RMSNorm, fused projections and the gated (SwiGLU) MLP.

All keep HF-style parameter names, so a family's checkpoint key map is a prefix swap; a fused
projection's HF split is undone at conversion time (models/keymap.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .keymap import Fused
from .old_layouts import accept_unfused


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as llama/baichuan/chatglm/mixtral do."""

    liger = False  # kernels: liger (models.pipeline.liger_blocks): liger's Triton RMSNorm, llama casting

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.liger:  # same numerics (fp32 rstd, cast back, times weight); in_place=False: dY is not reused
            from liger_kernel.ops import LigerRMSNormFunction
            return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)



def fused_linear(in_features: int, sizes: tuple[int, ...], bias: bool = False) -> nn.Linear:
    """Several projections of one input as one matmul (q/k/v, gate/up): one large GEMM instead
    of two or three smaller ones, and one weight-gradient GEMM in backward. Rows are the parts
    stacked in order; the caller splits the output (`.split(sizes, -1)`). A plain nn.Linear, so
    module swaps (torchao float8) apply to it. The HF checkpoint split is undone at conversion
    time (models/keymap.py), not per step."""
    return nn.Linear(in_features, sum(sizes), bias=bias)



class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); gate and up are one fused projection (rows [gate; up])."""

    liger = False  # kernels: liger: liger's SwiGLU kernel reads the fused [gate | up] output as it is

    def __init__(self, hidden: int, ffn: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = fused_linear(hidden, (ffn, ffn), bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)
        accept_unfused(self, "gate_up_proj", ("gate_proj", "up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.liger:
            from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction
            return self.down_proj(LigerFusedGateUpSiLUMulFunction.apply(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def gated_mlp_keys(ffn: int, bias: bool, prefix: str = "mlp.") -> dict:
    """hf_keys entries of a GatedMLP whose HF checkpoint has separate gate_proj / up_proj."""
    keys = {}
    for kind in ("weight", "bias") if bias else ("weight",):
        old = (f"{prefix}gate_proj.{kind}", f"{prefix}up_proj.{kind}")
        keys[f"{prefix}gate_up_proj.{kind}"] = Fused(old, (ffn, ffn), old)
        keys[f"{prefix}down_proj.{kind}"] = f"{prefix}down_proj.{kind}"
    return keys
