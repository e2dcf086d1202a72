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
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(bi, hi, qi, ki):
            keep = qi >= ki
            if doc is not None:
                keep = keep & (doc[bi, qi] == doc[bi, ki])
            if window is not None:
                keep = keep & (qi - ki < window)
            return keep

        return create_block_mask(mask_mod, b, None, s, s, device=position_ids.device)
    i = torch.arange(s, device=position_ids.device)
    mask = (i[:, None] >= i[None, :])[None]
    if window is not None:
        mask = mask & ((i[:, None] - i[None, :]) < window)[None]
    if doc is not None:
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return mask[:, None]



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
