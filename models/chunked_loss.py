"""Head projection + cross-entropy walked over token chunks (`head_chunk_tokens`): the
[tokens, vocab] logits never exist in full.

A head whose `chunked_loss` attribute is set (models.pipeline.chunked_heads) returns its normed
hidden states and projection weight (`loss.HeadInput`) instead of logits; the loss then takes, per
chunk of `tokens` rows, logits = hidden_chunk @ weight.T, the cross-entropy sum (and gdGPT's max-z
term when asked), each chunk under non-reentrant activation checkpointing: its logits are freed
as soon as its loss is known and recomputed in backward, one chunk at a time. Memory: one chunk's
logits (model dtype + fp32 + their gradient) instead of the whole row's, e.g. 4096 x 32000 x 10 B
= 1.3 GB instead of 41 GB at 128k tokens; cost: the head's forward matmul once more in backward
(~1% of a 7B stage's FLOPs). The weight is whatever the head projects with (an untied lm_head,
the embedding's matrix of a tied head, Baichuan2's row-normalised NormHead), computed once per
micro-batch outside the chunks, so autograd takes gradients to it as the unchunked head does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE = -100


@dataclass(frozen=True)
class ChunkSpec:
    """How a head's loss is chunked: `tokens` rows per chunk; `compiled`: each chunk's projection
    + cross-entropy runs compiled (GPU, compile_blocks: fused, no fp32 copy of the chunk's logits)."""

    tokens: int
    compiled: bool = False


def chunk_terms(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, with_ce: bool, with_z: bool):
    """One chunk: (sum of token cross-entropies, -100 ignored; sum over its rows of (max logit -
    logsumexp)^2), fp32; a term not asked for is 0."""
    logits = F.linear(hidden, weight).float()
    zero = logits.new_zeros(())
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") if with_ce else zero
    z = (logits.amax(dim=-1) - logits.logsumexp(dim=-1)).pow(2).sum() if with_z else zero
    return ce, z


@functools.cache
def _compiled_chunk_terms():
    return torch.compile(chunk_terms, dynamic=False)


def chunked_terms(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, spec: ChunkSpec,
                  with_ce: bool = True, with_z: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy sum over every token, sum over every position of (max logit - logsumexp)^2)
    of logits = hidden @ weight.T, without the whole logits: `spec.tokens` rows at a time.
    hidden [..., H] (flattened to rows), labels [...] (-100 = no loss; None when with_ce is False).
    `split` (not slicing) hands the chunks out, so backward concatenates their gradients once."""
    rows = hidden.flatten(0, -2)
    flat = labels.flatten() if labels is not None else torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    fn = _compiled_chunk_terms() if spec.compiled and rows.is_cuda else chunk_terms
    grad = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    ce = z = None
    for h, lab in zip(rows.split(spec.tokens), flat.split(spec.tokens)):
        if grad:
            c, zz = torch.utils.checkpoint.checkpoint(fn, h, weight, lab, with_ce, with_z, use_reentrant=False,
                                                            preserve_rng_state=False)  # no randomness inside
        else:
            c, zz = fn(h, weight, lab, with_ce, with_z)
        ce, z = (c, zz) if ce is None else (ce + c, z + zz)
    return ce, z
