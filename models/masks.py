"""Attention masks: causal, per packed document, sliding window, in the form the backend wants.

Built once per stage and micro-batch outside compiled code (`attention_mask`), or, in generation,
at the cache's offset (`offset_mask`).
"""
from __future__ import annotations

import weakref

import torch

from .attention import AttnOptions


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed rows restart position ids at 0 for each document: number the documents."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


class _LastMask:
    """The mask of the last position_ids tensor seen. Every block of a pipeline stage gets the
    same position_ids object for a micro-batch, so the mask is built once per stage and step."""

    def __init__(self):
        self.ref, self.key, self.mask = None, None, None

    def get(self, position_ids, key, build):
        if self.ref is not None and self.ref() is position_ids and self.key == key:
            return self.mask
        self.mask = build()
        self.ref, self.key = weakref.ref(position_ids), key
        return self.mask


_last_mask = _LastMask()


def attention_mask(position_ids: torch.Tensor, opts: AttnOptions, window: int | None = None):
    """The causal (+ per-document, + sliding-window) mask in the form `opts.impl` wants: None for
    plain causal, a boolean [B, 1, S, S] tensor (True = may attend) for SDPA/eager, a BlockMask for
    flex. Built outside compiled code and shared by all blocks of a stage."""
    if not opts.packed and window is None:
        return None
    return _last_mask.get(position_ids, (opts, window), lambda: _build_mask(whole_rows(position_ids, opts), opts, window))


def whole_rows(position_ids: torch.Tensor, opts: AttnOptions) -> torch.Tensor:
    """The positions the mask spans: with the seq axis every rank's slice of the rows (attention
    runs over the whole row there: models/sequence_parallel.py), else these."""
    if opts.seq is None:
        return position_ids
    from .sequence_parallel import gather_positions

    return gather_positions(position_ids, opts.seq)


def _build_mask(position_ids, opts: AttnOptions, window):
    b, s = position_ids.shape
    doc = document_ids(position_ids) if opts.packed else None
    if opts.impl == "flex":
        return document_block_mask(doc, b, s, window, position_ids.device)
    i = torch.arange(s, device=position_ids.device)
    mask = (i[:, None] >= i[None, :])[None]
    if window is not None:
        mask = mask & ((i[:, None] - i[None, :]) < window)[None]
    if doc is not None:
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return mask[:, None]



# Rows longer than this are refused (one config line, engine.plan.check_dense_attention) on a path that
# materialises an [S, S] tensor: a [B, 1, S, S] boolean mask is 256 MiB per row at 16k and 16 GiB at
# 128k, SDPA's float ALiBi bias and eager's scores H times that.
DENSE_MASK_MAX_SEQ = 16384


def dense_attention(impl: str, packed: bool, window: int | None, alibi: bool) -> str | None:
    """Why attention of this kind builds an [S, S] tensor per row (None: it does not; FlexAttention
    with the BlockMask below, SDPA / flash-attn plain causal)."""
    if impl == "eager":
        return "attention impl eager materialises the [S, S] scores"
    if alibi and not (impl == "flex" and packed):
        return f"ALiBi on {impl} adds a dense [B, heads, S, S] bias (FlexAttention takes it as a score_mod with packing: true)"
    if (packed or window is not None) and impl != "flex":
        kind = "document" if packed else "sliding-window"
        return f"the {kind} mask on {impl} is a dense [B, 1, S, S] tensor (FlexAttention builds a block table instead)"
    return None


FLEX_BLOCK = 128  # FlexAttention's default tile: the block table has ceil(S / 128)^2 entries per row


def document_block_mask(doc: torch.Tensor | None, b: int, s: int, window: int | None, device):
    """The causal (+ per-document, + sliding-window) BlockMask of rows of `s` tokens, built from
    each 128-token block's first and last document id: O((S/128)^2) block tables, never an
    [S, S] tensor (create_block_mask uncompiled evaluates the mask at every [B, 1, S, S] point:
    16 GiB of booleans at 128k). Document ids rise along a row, so a key block and a later query
    block share a document iff the key block's last id equals the query block's first, and every
    pair of them does iff the key block's first id equals the query block's last; the diagonal
    block is partial. Blocks running past `s` (its last, when 128 does not divide it) are never
    full, as create_block_mask pads them. Same block tables as create_block_mask
    (tests/test_long_context.py); the kernel applies `mask_mod` inside the partial blocks only.
    doc: [B, S] document ids (None: one document per row; b rows)."""
    from torch.nn.attention.flex_attention import BlockMask

    ids = doc if doc is not None else torch.zeros(b, s, dtype=torch.int32, device=device)
    n = -(-s // FLEX_BLOCK)
    start = torch.arange(n, device=device) * FLEX_BLOCK
    end = (start + FLEX_BLOCK - 1).clamp(max=s - 1)
    first, last = ids[:, start], ids[:, end]  # [B, n]
    qb, kb = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    below = (kb < qb)[None]
    some = (kb == qb)[None] | (below & (last[:, None, :] == first[:, :, None]))
    complete = start + FLEX_BLOCK <= s
    full = below & (first[:, None, :] == last[:, :, None]) & (complete[:, None] & complete[None, :])[None]
    if window is not None:  # nearest pair of the blocks within the window / farthest pair too
        some = some & ((start[:, None] - end[None, :]) < window)[None]
        full = full & ((end[:, None] - start[None, :]) < window)[None]

    def mask_mod(bi, hi, qi, ki):
        keep = qi >= ki
        if doc is not None:
            keep = keep & (doc[bi, qi] == doc[bi, ki])
        if window is not None:
            keep = keep & (qi - ki < window)
        return keep

    def ordered(table):  # [B, 1, n, n] -> per query block: how many key blocks, and which first
        num = table.sum(-1, dtype=torch.int32)
        return num, torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    kv_num, kv_idx = ordered((some & ~full)[:, None])
    full_num, full_idx = ordered(full[:, None])
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(s, s))


def offset_mask(length: int, s: int, window: int | None, device) -> torch.Tensor | None:
    """[1, 1, S, length + S] bool: S new queries after `length` cached keys, causal at the offset
    and within the sliding window; None when a single query may see every key."""
    t = length + s
    if s == 1 and (window is None or t <= window):
        return None
    q = torch.arange(length, t, device=device)[:, None]
    keys = torch.arange(t, device=device)[None]
    keep = keys <= q
    if window is not None:
        keep = keep & (q - keys < window)
    return keep[None, None]
