"""Causal-LM loss with global token normalisation.

Labels arrive already shifted (labels[t] is the target of position t; -100 = no loss), with a
scale chosen by the data loader so that the loss of a global batch is
sum(token losses) / (answer tokens in the global batch), whatever the micro-batching or
data-parallel split (see data.loader.micro_batches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    labels, scale = target
    ce = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return ce * scale.to(ce.dtype)
