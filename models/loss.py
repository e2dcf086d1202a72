"""Causal-LM loss with global token normalisation.

Labels arrive already shifted (labels[t] is the target of position t; -100 = no loss), with a
scale chosen by the data loader so that the loss of a global batch is
sum(token losses) / (answer tokens in the global batch), whatever the micro-batching or
data-parallel split (see data.loader.micro_batches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked_loss import ChunkSpec, chunked_terms

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    labels, scale = target
    if isinstance(logits, HeadInput) and logits.spec is not None:  # head_chunk_tokens: never the whole logits
        ce, _ = chunked_terms(*logits, labels, logits.spec)
        return ce * scale.to(ce.dtype)
    ce = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return ce * scale.to(ce.dtype)


class HeadInput(tuple):
    """(hidden [B, S, H], head weight [V, H]): what a head returns instead of logits under
    `kernels: liger`, so the loss projects and takes the cross-entropy in one fused pass, or with
    `spec` set (head_chunk_tokens, models/chunked_loss.py), chunk by chunk."""

    spec: ChunkSpec | None = None


def head_output(owner, x: torch.Tensor, weight: torch.Tensor):
    """HeadInput(x, weight) when `owner` (a head, or the embedding a tied head projects through)
    is chunked (`owner.chunked_loss`, set by models.pipeline.chunked_heads), else None: the head
    then computes its logits as always."""
    spec = getattr(owner, "chunked_loss", None)
    if spec is None:
        return None
    out = HeadInput((x, weight))
    out.spec = spec
    return out


def liger_causal_lm_loss(outputs, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """causal_lm_loss through liger-kernel's fused linear cross-entropy when the head handed over
    HeadInput: sum of the token losses (-100 ignored) times the loader's scale, as causal_lm_loss;
    the vocabulary is walked in chunks, so no [B*S, V] logits exist. Logits (a head that was not
    swapped, e.g. a tied one) go to causal_lm_loss."""
    if not isinstance(outputs, HeadInput):
        return causal_lm_loss(outputs, target)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden, weight = outputs
    labels, scale = target
    ce = liger_fused_linear_cross_entropy(hidden.flatten(0, -2), weight, labels.flatten(), ignore_index=IGNORE,
                                          reduction="sum", accum_dtype=torch.float32)
    return ce.float() * scale.to(torch.float32)


def max_z(logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of (max_v log_softmax(logits))^2 = (max logit - logsumexp)^2 (fp32)."""
    logits = logits.float()
    return (logits.amax(dim=-1) - logits.logsumexp(dim=-1)).pow(2).mean()


class MaxZLoss:
    """gdGPT's `aux_max_z_loss`: `base(outputs, target) + weight * max_z(logits)`.

    As in gdGPT, the term covers every position of the micro-batch (prompt and padding too) and
    is already a mean, so it enters with factor 1: DeepSpeed's 1/(gas * dp) averaging of the
    micro-batch losses makes the step's term the mean over micro-batches, as gdGPT had it.
    `pop_metrics()` adds `z_loss` (the unweighted term, summed over micro-batches since the last
    pop) to the base loss's own metrics (or `lm_loss` for the plain causal-LM loss).
    """

    def __init__(self, base, weight: float):
        self.base, self.weight = base, weight
        self._sums: torch.Tensor | None = None

    def __call__(self, outputs, target) -> torch.Tensor:
        logits = outputs[0] if isinstance(outputs, tuple) and not isinstance(outputs, HeadInput) else outputs
        lm = self.base(outputs, target)
        if isinstance(logits, HeadInput):  # chunked head: a second walk over the chunks for the z term
            _, z = chunked_terms(*logits, None, logits.spec, with_ce=False, with_z=True)
            z = z / logits[0].shape[:-1].numel()
        else:
            z = max_z(logits)
        terms = torch.stack((lm.detach().float(), z.detach()))
        self._sums = terms if self._sums is None else self._sums + terms
        return lm + self.weight * z.to(lm.dtype)

    def pop_metrics(self) -> dict[str, float]:
        base_loss, z = self._sums.tolist() if self._sums is not None else (0.0, 0.0)
        self._sums = None
        pop = getattr(self.base, "pop_metrics", None)
        return {**(pop() if pop else {"lm_loss": base_loss}), "z_loss": z}
