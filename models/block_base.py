"""The block contract: `BlockBase` (what every family's transformer block subclasses), the per-run
`LayerOptions` every layer honours, and `LayerDef` / `decoder_layers` (a family's pipeline layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import AttnOptions
from .kv_cache import KVCache, StaticKVCache
from .masks import attention_mask
from .recompute import checkpointed, compile_fixed, resolve_ckpt_mode


@dataclass(frozen=True)
class LayerDef:
    """One pipeline layer of a family: built as `cls(args, opts)`.

    Layers with the same `tie` key share one module (tied embeddings); a twin that is not the
    first runs `forward_fn(module, inputs)` instead of the module's own forward.
    """

    cls: type
    tie: str | None = None
    forward_fn: Callable | None = None


def decoder_layers(n_blocks: int, embed: type, block: type, final_norm: type | None, head: type,
                   tied_logits: Callable | None = None, embed_extra: tuple[type, ...] = ()) -> list[list[LayerDef]]:
    """A decoder's pipeline layers grouped as `parts` counts them: the embedding (+ `embed_extra`
    layers in its slot), each block, and the final norm + head. With `tied_logits` the head is
    the final norm followed by the embedding's twin, which projects through `tied_logits(embed,
    inputs)` with the embedding's own weight."""
    tie = "embed" if tied_logits else None
    last = [LayerDef(final_norm), LayerDef(embed, tie, tied_logits)] if tie else [LayerDef(head)]
    first = [LayerDef(embed, tie), *map(LayerDef, embed_extra)]
    return [first] + [[LayerDef(block)] for _ in range(n_blocks)] + [last]


@dataclass(frozen=True)
class LayerOptions:
    """Per-run choices every family's layers honour (from the training config)."""

    attn: AttnOptions = AttnOptions()
    # Activation recompute in backward: False/"none", True/"full" (whole block), or "selective"
    # (keep matmul and attention outputs, recompute the cheap elementwise ops between them).
    grad_ckpt: bool | str = False
    compile: bool = False  # torch.compile each block (fixed shapes, one graph per block)
    max_z_loss: float = 0.0  # weight of gdGPT's max-z term (models.loss.MaxZLoss); read by the loss only
    fp8: str = "off"  # float8 training of the block linears (FP8_MODES; models.pipeline.float8_blocks)
    fp8_head: bool = False  # also the head's lm_head (models.pipeline.float8_blocks)
    kernels: str = "inductor"  # KERNELS: liger swaps in liger-kernel's ops (models.pipeline.liger_blocks)
    offload: bool = False  # offload_activations: recompute's saved block inputs go to CPU memory (models/offload.py)
    head_chunk: int = 0  # head_chunk_tokens: the head hands the loss (hidden, weight) to chunk (models.pipeline.chunked_heads)

    @property
    def ckpt_mode(self) -> str:
        return resolve_ckpt_mode(self.grad_ckpt)


FP8_MODES = ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao.float8 recipes (engine resolves auto)
KERNELS = ("inductor", "liger")


class BlockBase(nn.Module):
    """A transformer block as a pipeline layer: maps (hidden, position_ids) -> same.

    Subclasses implement `block(x, position_ids, mask)`; the attention mask comes from
    `attention_mask` (models/masks.py), built here outside the block so the block itself can be
    compiled with fixed shapes. Activation checkpointing and compiling are done here, by the
    policy of models/recompute.py.
    """

    window: int | None = None  # sliding-window attention span, for families that have one

    def __init__(self, opts: LayerOptions):
        super().__init__()
        self.ckpt_mode, self.attn_opts, self.offload = opts.ckpt_mode, opts.attn, opts.offload
        if opts.compile:
            self.compile_block()

    def block(self, x: torch.Tensor, position_ids: torch.Tensor, mask, cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
        raise NotImplementedError

    def compile_block(self) -> None:
        """Compile `block` for fixed shapes (one graph per block; no recompiles per step)."""
        self.block = compile_fixed(self.block)

    def run_block(self, x: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | StaticKVCache | None = None):
        """`block`, recomputed in backward when checkpointing (a family whose block returns more
        than the hidden states, e.g. MoE router statistics, calls this from its own forward).
        cache: generation (KVCache of this block's attention; x holds only the new tokens)."""
        if cache is not None:
            return self.block(x, position_ids, cache.mask(x.shape[1], self.window, x.device), cache)
        mask = attention_mask(position_ids, self.attn_opts, self.window)
        if self.ckpt_mode == "none" or not (self.training and torch.is_grad_enabled()):
            return self.block(x, position_ids, mask)
        return checkpointed(self.block, self.ckpt_mode, x, position_ids, mask, offload=self.offload)

    def forward(self, inputs, cache: KVCache | StaticKVCache | None = None):
        x, position_ids = inputs
        return self.run_block(x, position_ids, cache), position_ids
