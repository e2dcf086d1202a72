"""QLoRA's frozen base (`lora.base_quant: nf4`): the transformer blocks' linear weights stored in
4 bits as torchao's NF4Tensor (QLoRA's NormalFloat4 with double-quantized absmax scales), the
rest of the model (embedding, norms, head, biases, mixtral's stacked experts and router) in the
run's dtype.

Which weights: the linears LoRA can adapt (models/lora.py `block_linears`: nn.Linear here and in
the HF model), frozen ones only (a modules_to_save linear trains in full and stays as it is), as
QLoRA / bitsandbytes quantize a model's linears and leave its embedding and head alone.

Storage (torchao's layout, `nf4_nbytes` counts it, the dry run uses that): per weight of n
elements n/2 bytes of 4-bit codes, one int8 scale per BLOCK elements, one scale-of-scales in the
weight's dtype per SCALER_BLOCK scales, plus the scales' mean and the 16-entry code table. So
~0.52 bytes per parameter instead of 2 (bf16).

The forward dequantizes one linear at a time: a quantized linear becomes an NF4Linear, whose
forward is the `ppllm::nf4_linear` op: it rebuilds the weight in the input's dtype for its matmul
(as torchao's LinearNF4 does, bitwise) and again in backward for the input gradient (the weight
itself gets none), so at most one linear's full-precision weight exists at a time beside the
4-bit stage. Why an opaque op and not torchao's LinearNF4 (an autograd.Function): under
compile_blocks, AOT autograd inlines LinearNF4 into the block's joint graph and the min-cut
partitioner then keeps each dequantized [out, in] weight for backward rather than recompute it
(measured on a llama-7B shape: the 4-bit base peaked above the 16-bit one). The op's own
autograd saves only the 4-bit parts, so no graph can keep a full-precision weight.

The quantized weight is a plain tensor attribute of its linear (`linear.weight`), not a Parameter
or buffer: nothing that walks parameters sees it. DeepSpeed would otherwise broadcast it byte-wise
over data-parallel ranks, cast it to the run's dtype (dequantizing it) and move it; the optimizer,
the checkpoint writer (adapter-only tags) and state_dict leave it out. It is therefore made on the
device the engine trains on, and the full-precision Parameter is dropped as its copy is made
(engine/training/qlora.py builds, loads and quantizes one block at a time).
"""
from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from .block_base import BlockBase

NONE, NF4 = "none", "nf4"
BASE_QUANT = (NONE, NF4)
BLOCK = 64  # elements per absmax scale (QLoRA's and torchao's default)
SCALER_BLOCK = 256  # scales per double-quantization block (torchao's default)


def nf4_layout(numel: int) -> tuple[int, int] | None:
    """(block, scaler block) torchao's to_nf4 is called with for a weight of `numel` elements; None:
    the weight stays unquantized (torchao needs whole blocks). The scaler block must divide the
    number of blocks: 256 for every real model's linears, smaller for tiny test shapes."""
    if numel % BLOCK:
        return None
    return BLOCK, math.gcd(numel // BLOCK, SCALER_BLOCK)


def nf4_nbytes(numel: int, elem_bytes: int) -> int:
    """Bytes a weight of `numel` elements takes as torchao stores it (elem_bytes: its dtype's; an
    unquantizable weight keeps it)."""
    layout = nf4_layout(numel)
    if layout is None:
        return numel * elem_bytes
    blocks = numel // layout[0]
    scaler_blocks = blocks // layout[1]
    # a single scale-of-scales stays a view of its whole scaler block's buffer (torchao's
    # double_quantize_scalers: `.contiguous()` of one element copies nothing)
    factors = layout[1] if scaler_blocks == 1 else scaler_blocks
    # codes (2 per byte) + int8 scales + scale-of-scales + scales' mean + the 16-entry code table
    return numel // 2 + blocks + factors * elem_bytes + elem_bytes + 16 * elem_bytes


def _torchao_nf4():
    """(NF4Tensor, to_nf4): torchao.quantization's since 0.18, torchao.dtypes' before (0.17 on torch 2.11)."""
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError:
        from torchao.dtypes import NF4Tensor, to_nf4
    return NF4Tensor, to_nf4


def is_nf4(t) -> bool:
    return isinstance(t, _torchao_nf4()[0])


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of device memory a (possibly NF4) tensor holds: its inner tensors for an NF4Tensor."""
    if is_nf4(t):
        names, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).untyped_storage().nbytes() for n in names)
    return t.untyped_storage().nbytes()


# ------------------------------------------------------------------------- the 4-bit linear
DEQUANT_CHUNK = 1 << 24  # weight elements dequantized per step (a multiple of BLOCK)
# transient bytes per element of a step, at most: the int32 index of its byte (4 per 2 elements) and its
# table entry (the weight's dtype, <= 4)
DEQUANT_CHUNK_BYTES = 6


def dequantize(data, scalers, factor, mean, table, shape: list[int], dtype: torch.dtype, block: int,
               scaler_block: int) -> torch.Tensor:
    """The [out, in] weight in `dtype` from an NF4Tensor's parts: torchao's get_original_weight,
    element for element the same arithmetic (the code's table entry times its block's scale, one
    rounding in the weight's dtype; the scales as torchao's dequantize_scalers makes them), so the
    same bits. Each byte holds two codes (element 2i in its high nibble, 2i + 1 in its low one), so
    one lookup in a 256-entry table of pairs decodes it. Done DEQUANT_CHUNK elements at a time:
    besides the result it holds at most DEQUANT_CHUNK * DEQUANT_CHUNK_BYTES bytes of transients,
    where torchao's holds ~14 bytes per element of the whole weight (int64 codes, halves, products)."""
    scale = (scalers.view(-1, scaler_block) / factor.unsqueeze(-1)).flatten().to(dtype) + mean
    pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), dim=-1)  # byte b: (table[b >> 4], table[b & 15])
    n = data.numel() * 2
    w = torch.empty(n, dtype=dtype, device=data.device)
    for lo in range(0, n, DEQUANT_CHUNK):
        hi = min(lo + DEQUANT_CHUNK, n)
        codes = pairs[data[lo // 2:hi // 2].int()]  # [(hi - lo) / 2, 2]: the chunk's elements in order
        torch.mul(codes.view(-1, block), scale[lo // block:hi // block, None], out=w[lo:hi].view(-1, block))
    return w.view(shape)


@torch.library.custom_op("ppllm::nf4_linear", mutates_args=())
def _nf4_linear(x: torch.Tensor, data: torch.Tensor, scalers: torch.Tensor, factor: torch.Tensor,
                mean: torch.Tensor, table: torch.Tensor, shape: list[int], dtype: torch.dtype, block: int,
                scaler_block: int) -> torch.Tensor:
    """x @ W^T, W dequantized here and dropped on return (torchao's LinearNF4 forward, bitwise)."""
    return F.linear(x, dequantize(data, scalers, factor, mean, table, shape, dtype, block, scaler_block).to(x.dtype))


@_nf4_linear.register_fake
def _(x, data, scalers, factor, mean, table, shape, dtype, block, scaler_block):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("ppllm::nf4_linear_grad_input", mutates_args=())
def _nf4_grad_input(grad: torch.Tensor, data: torch.Tensor, scalers: torch.Tensor, factor: torch.Tensor,
                    mean: torch.Tensor, table: torch.Tensor, shape: list[int], dtype: torch.dtype, block: int,
                    scaler_block: int) -> torch.Tensor:
    """grad @ W, W dequantized again (torchao's LinearNF4 backward, bitwise)."""
    return grad @ dequantize(data, scalers, factor, mean, table, shape, dtype, block, scaler_block).to(grad.dtype)


@_nf4_grad_input.register_fake
def _(grad, data, scalers, factor, mean, table, shape, dtype, block, scaler_block):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


def _setup_context(ctx, inputs, output):
    # only the 4-bit parts are saved (not x: the frozen weight gets no gradient)
    ctx.save_for_backward(*inputs[1:6])
    ctx.meta = inputs[6:]


def _backward(ctx, grad):
    gx = _nf4_grad_input(grad, *ctx.saved_tensors, *ctx.meta) if ctx.needs_input_grad[0] else None
    return (gx,) + (None,) * 9


_nf4_linear.register_autograd(_backward, setup_context=_setup_context)


def nf4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an NF4Tensor weight, as torchao computes it (bias added after),
    through the opaque ppllm::nf4_linear op (module docstring: why not torchao's LinearNF4)."""
    assert weight.ndim == 2 and weight.is_contiguous(), "nf4_linear: a contiguous [out, in] NF4 weight"
    out = _nf4_linear(x, weight.quantized_data, weight.quantized_scalers, weight.quantization_factor,
                      weight.scaler_mean, weight.nf4, list(weight.shape), weight.dtype, weight.block_size,
                      weight.scaler_block_size)
    return out if bias is None else out + bias


class NF4Linear(nn.Linear):
    """A block linear whose frozen weight quantize_linear made an NF4Tensor: its forward is nf4_linear.
    It replaces the linear's own class (nn.Linear, or the wgrad-fused one, whose frozen weight takes
    the plain path anyway); LoRA's mixin stays in front of it (_nf4_class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)


def _nf4_class(cls: type) -> type:
    """The class a quantized linear of class `cls` takes: NF4Linear, under LoRA's mixin when it has
    one (models/lora.py adds it before or after quantization, and makes the same class either way)."""
    from .lora import LoraLinear, _lora_class

    return _lora_class(NF4Linear) if issubclass(cls, LoraLinear) else NF4Linear


def quantizable(family: ModuleType, args) -> dict[str, nn.Linear]:
    """{module name in a block: linear (meta)} of the linears nf4 may store in 4 bits."""
    from .lora import block_linears

    return block_linears(family, args)


def frozen_linears(family: ModuleType, args, spec, layer_keys: dict) -> list[str]:
    """The names of one block's linears nf4 stores: the quantizable ones LoRA leaves frozen (a
    modules_to_save linear trains whole and stays as it is). layer_keys: the block's hf_keys entry."""
    from .lora import is_trainable

    return [n for n in quantizable(family, args) if not is_trainable(f"{n}.weight", layer_keys, spec)]


def quantize_linear(linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> bool:
    """Replace a linear's weight by its NF4Tensor (made on `device` from the weight in `dtype`);
    False (left as it is) for one torchao cannot block. The old Parameter is dropped here: call
    before anything else (optimizer, engine) holds it."""
    w = linear.weight
    layout = nf4_layout(w.numel())
    if is_nf4(w) or layout is None:
        return False
    q = _torchao_nf4()[1](w.detach().to(device=device, dtype=dtype).contiguous(), *layout)
    del linear._parameters["weight"]
    linear.weight = q  # a plain attribute (module docstring)
    linear.__class__ = _nf4_class(type(linear))  # forward through nf4_linear (same parameters and state dict)
    return True


def quantize_block(block: BlockBase, names: list[str], device: torch.device, dtype: torch.dtype) -> int:
    """NF4 for the linears `names` of one transformer block, one at a time; returns how many."""
    return sum(quantize_linear(block.get_submodule(name), device, dtype) for name in names)
