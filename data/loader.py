"""Deterministic global batches, split across data-parallel ranks and gradient-accumulation steps.

Epoch e shuffles the rows with a permutation that depends only on (seed, e); global step s
(counted from the start of training) takes rows [j*G, (j+1)*G) of its epoch's permutation,
j = s mod steps_per_epoch, G = micro_batch_size * grad_accum * dp_size. Within a global batch,
dp rank r owns the contiguous block r of grad_accum * micro_batch_size rows, cut into its
micro-batches in order. Nothing is stateful, so resuming at step k is just micro_batches(k).

Loss normalisation: each micro-batch carries scale = grad_accum * dp_size / N, N = loss tokens
of the whole global batch (known locally from dataset.n_loss_tokens: no communication). The
loss sum(CE) * scale, averaged over micro-batches and ranks as DeepSpeed does, equals
sum(CE over the global batch) / N: every answer token weighs the same, however the tokens
fall into micro-batches.

Sequence parallelism (seq_size N > 1): the N seq ranks of a data-parallel rank share its rows,
each taking the contiguous slice seq_rank of every row's columns (tokens, positions, labels:
labels are already shifted, so a slice holds its own targets). DeepSpeed sees dp_size * N
data-parallel ranks and averages over all of them while the N slices of a row add up to its
loss, so the scale counts dp_size * N.
"""
from __future__ import annotations

import numpy as np
import torch


class StepLoader:
    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int,
                 n_epochs: int, seq_rank: int = 0, seq_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if not 0 <= seq_rank < seq_size:
            raise ValueError(f"seq_rank {seq_rank} outside [0, {seq_size})")
        self.seq_rank, self.seq_size = seq_rank, seq_size
        self.dataset = dataset
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.n_epochs = seed, n_epochs
        self.global_batch = micro_batch_size * grad_accum * dp_size
        self.steps_per_epoch = len(dataset) // self.global_batch  # the incomplete last batch is dropped
        self.total_steps = self.steps_per_epoch * n_epochs  # 0 when one global batch cannot be filled:
        # the trainer reports that with its config context
        self._epoch, self._perm = None, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self._perm

    def global_rows(self, step: int) -> np.ndarray:
        """Row indices of global step `step`, all ranks' rows, rank-major."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside [0, {self.total_steps})")
        epoch, j = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[j * self.global_batch:(j + 1) * self.global_batch]

    def rank_rows(self, step: int) -> np.ndarray:
        per_rank = self.global_batch // self.dp_size
        return self.global_rows(step)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def loss_scale(self, step: int) -> float:
        n = int(self.dataset.n_loss_tokens[self.global_rows(step)].sum())
        return self.grad_accum * self.dp_size * self.seq_size / n if n else 0.0

    def micro_batches(self, step: int) -> list:
        """[((input_ids, position_ids), (labels, scale))] * grad_accum for this rank."""
        scale = torch.tensor(self.loss_scale(step), dtype=torch.float32)
        rows = self.rank_rows(step)
        batches = []
        for m in range(self.grad_accum):
            items = [self.dataset[int(i)] for i in rows[m * self.micro_batch_size:(m + 1) * self.micro_batch_size]]
            stack = {k: seq_slice(torch.from_numpy(np.stack([it[k] for it in items])), self.seq_rank, self.seq_size)
                     for k in items[0]}
            batches.append(((stack["input_ids"], stack["position_ids"]), (stack["labels"], scale)))
        return batches

    def tokens(self, step: int) -> int:
        """Real (non-pad) tokens of the whole global batch, for tokens/s."""
        return int(self.dataset.n_tokens[self.global_rows(step)].sum())


def seq_slice(rows: torch.Tensor, seq_rank: int, seq_size: int) -> torch.Tensor:
    """Columns [seq_rank * S/N, (seq_rank + 1) * S/N) of [B, S] rows (contiguous: a tensor of its own)."""
    if seq_size == 1:
        return rows
    s = rows.shape[1] // seq_size
    return rows[:, seq_rank * s:(seq_rank + 1) * s].contiguous()
