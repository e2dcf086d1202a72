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

The forward dequantizes one linear at a time: F.linear on an NF4Tensor runs torchao's LinearNF4,
which rebuilds that weight in the input's dtype for its matmul (and again for the input gradient
in backward; the weight itself gets none), so at most one linear's full-precision weight exists
at a time beside the 4-bit stage.

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
    linear.weight = q  # a plain attribute (module docstring); F.linear dispatches to torchao's LinearNF4
    return True


def quantize_block(block: BlockBase, names: list[str], device: torch.device, dtype: torch.dtype) -> int:
    """NF4 for the linears `names` of one transformer block, one at a time; returns how many."""
    return sum(quantize_linear(block.get_submodule(name), device, dtype) for name in names)
