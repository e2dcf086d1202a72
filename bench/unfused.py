"""Bench-only: run our layers as they were before the fused projections (the 'before' of an A/B
in one device call). q/k/v and gate/up become separate GEMMs on row slices of the fused weight,
the shapes the unfused layers ran; the weights, checkpoints and everything else are unchanged."""
from __future__ import annotations

import torch.nn.functional as F

from models import llama
from models.attention import attend
from models.norm_mlp import GatedMLP
from models.positions import apply_rotary


def _attention_forward(self, x, position_ids, mask, cache=None):
    b, s, _ = x.shape
    w, bias = self.qkv_proj.weight, self.qkv_proj.bias
    q, k, v = (F.linear(x, wi, bi) for wi, bi in zip(w.split(self.qkv_sizes), bias.split(self.qkv_sizes)
                                                       if bias is not None else (None,) * 3))
    q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
    k = k.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
    v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
    cos, sin = self.rotary(position_ids, q.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return self.o_proj(attend(q, k, v, mask, self.attn, cache=cache))


def _mlp_forward(self, x):
    w_gate, w_up = self.gate_up_proj.weight.chunk(2)
    b_gate, b_up = self.gate_up_proj.bias.chunk(2) if self.gate_up_proj.bias is not None else (None, None)
    return self.down_proj(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up))


def patch() -> None:
    llama.Attention.forward = _attention_forward
    GatedMLP.forward = _mlp_forward
