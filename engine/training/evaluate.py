"""Held-out loss and perplexity during training (`eval_data_path`, `evaluate_every`).

The eval loss is the token-weighted mean over the whole held-out set: the sum of the
cross-entropy of every answer token divided by their number, however the rows fall into
micro-batches, data-parallel ranks and eval steps. The held-out rows are taken in file order,
global batch by global batch (micro x grad_accum x dp rows, as in training); the last batch is
filled with empty rows (no loss tokens). Every micro-batch carries scale = grad_accum * dp / N
(N = loss tokens of the evaluated rows), so the per-step outputs of `engine.eval_batch`
(averaged over micro-batches and dp ranks by DeepSpeed) sum to sum(CE) / N.

A family whose loss adds an auxiliary term (mixtral's router loss) reports its LM part through
`loss_fn.pop_metrics()`; that part, reduced over all ranks, is the eval loss then.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from data.loader import seq_slice
from models.loss import IGNORE

from engine.config import ConfigError


class EvalBatches:
    """Micro-batches of held-out rows for one data-parallel rank, step by step."""

    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int,
                 max_steps: int = 0, seq_rank: int = 0, seq_size: int = 1):
        self.dataset, self.mb, self.ga = dataset, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_rank, self.seq_size = seq_rank, seq_size  # each seq rank: its slice of the rows (data.loader)
        self.ranks = dp_size * seq_size  # what DeepSpeed averages over
        self.global_batch = micro_batch_size * grad_accum * dp_size
        self.n_steps = math.ceil(len(dataset) / self.global_batch)
        if max_steps:
            self.n_steps = min(self.n_steps, max_steps)
        self.n_rows = min(len(dataset), self.n_steps * self.global_batch)
        self.n_loss_tokens = int(np.asarray(dataset.n_loss_tokens[:self.n_rows]).sum())
        self.scale = torch.tensor(grad_accum * self.ranks / self.n_loss_tokens if self.n_loss_tokens else 0.0,
                                  dtype=torch.float32)

    def _row(self, i: int) -> dict[str, np.ndarray]:
        if i < self.n_rows:
            return self.dataset[i]
        s = self.dataset.max_seq_len  # an empty row: pad tokens, no labels
        return {"input_ids": np.full(s, self.dataset.pad_id, dtype=np.int64),
                "labels": np.full(s, IGNORE, dtype=np.int64), "position_ids": np.arange(s, dtype=np.int64)}

    def micro_batches(self, step: int) -> list:
        """[((input_ids, position_ids), (labels, scale))] * grad_accum for this rank."""
        start = step * self.global_batch + self.dp_rank * self.mb * self.ga
        out = []
        for m in range(self.ga):
            items = [self._row(start + m * self.mb + j) for j in range(self.mb)]
            stack = {k: seq_slice(torch.from_numpy(np.stack([it[k] for it in items])), self.seq_rank, self.seq_size)
                     for k in items[0]}
            out.append(((stack["input_ids"], stack["position_ids"]), (stack["labels"], self.scale)))
        return out


def _result(loss: float, batches: EvalBatches) -> dict:
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0)), "eval_tokens": batches.n_loss_tokens}


def evaluate_pipeline(engine, batches: EvalBatches, loss_fn=None) -> dict:
    """Eval loss of a DeepSpeed PipelineEngine (call on every rank; every rank gets the result)."""
    pop = getattr(loss_fn, "pop_metrics", None)
    if pop is not None:
        pop()  # drop anything not yet collected (the training step pops its own)
    total = 0.0
    for step in range(batches.n_steps):
        out = engine.eval_batch(iter(batches.micro_batches(step)), num_micro_batches=batches.ga)
        total += float(out)
    engine.module.train()
    if pop is not None:  # the LM term alone, summed over every micro-batch of every rank
        lm = torch.tensor([pop().get("lm_loss", 0.0)], dtype=torch.float64, device=engine.device)
        torch.distributed.all_reduce(lm)
        total = float(lm) / (batches.ga * batches.ranks)
    return _result(total, batches)


@torch.no_grad()
def evaluate_module(forward, batches: EvalBatches, loss_fn, group=None) -> dict:
    """Eval loss of a plain module (`forward((input_ids, position_ids)) -> outputs`), e.g. under
    ZeRO, where every rank runs the whole model on its own rows; sums are all-reduced over
    `group` (the data-parallel group) when torch.distributed is initialised."""
    pop = getattr(loss_fn, "pop_metrics", None)
    total = 0.0
    for step in range(batches.n_steps):
        for inputs, target in batches.micro_batches(step):
            loss = loss_fn(forward(inputs), target)
            total += float(loss)
    if pop is not None:
        total = pop().get("lm_loss", total)
    value = torch.tensor([total], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.cuda.is_available():
            value = value.cuda()
        torch.distributed.all_reduce(value, group=group)
    return _result(float(value) / (batches.ga * batches.ranks), batches)


class Evaluator:
    """The held-out set of a run and when to evaluate it (config: eval_data_path, evaluate_every,
    eval_batches). Works on either engine: a PipelineEngine evaluates with `eval_batch`, any
    other DeepSpeed engine (ZeRO) runs its module's forward + loss_fn on its own rows."""

    def __init__(self, cfg, hf_dir, engine):
        from data.dataset import build_dataset

        from engine.model import load_tokenizer

        self.every = int(cfg.evaluate_every or 0)
        self.pipeline = hasattr(engine, "eval_batch") and hasattr(engine, "is_last_stage")
        if self.pipeline:
            dp_rank, dp_size = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
        else:
            dp_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            dp_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        tokenizer = load_tokenizer(hf_dir)
        dataset = build_dataset(cfg.eval_data_path, tokenizer, cfg.max_seq_len, packing=cfg.packing,
                                skip_bad_samples=cfg.skip_bad_samples, template=cfg.prompt_template,
                                cache_dir=cfg.cache_dir or str(Path(cfg.save_path) / "data_cache"), seed=cfg.seed)
        if dataset.stats["loss_tokens"] == 0:
            raise ConfigError(f"{cfg.source}: eval_data_path has no answer tokens within max_seq_len "
                              f"{cfg.max_seq_len} (samples dropped: {dataset.stats['dropped']})")
        n = cfg.seq_dim  # seq ranks are DeepSpeed data-parallel ranks, innermost: rank d * n + s
        self.batches = EvalBatches(dataset, cfg.micro_batch, cfg.grad_accum, dp_rank // n, dp_size // n, cfg.eval_batches,
                                   seq_rank=dp_rank % n, seq_size=n)

    @classmethod
    def maybe(cls, cfg, hf_dir, engine) -> "Evaluator | None":
        return cls(cfg, hf_dir, engine) if getattr(cfg, "eval_data_path", None) else None

    def due(self, step: int, total: int) -> bool:
        """Every `evaluate_every` steps and after the last step (evaluate_every 0: only the last)."""
        return step == total or (self.every > 0 and step % self.every == 0)

    def run(self, engine) -> dict:
        loss_fn = getattr(engine.module, "loss_fn", None)
        if self.pipeline:
            return evaluate_pipeline(engine, self.batches, loss_fn)
        was_training = engine.module.training
        engine.eval()
        try:
            device = engine.device

            def forward(inputs):
                return engine(*(t.to(device) for t in inputs))

            def loss(outputs, target):
                labels, scale = target
                return loss_fn(outputs, (labels.to(device), scale.to(device)))

            loss.pop_metrics = getattr(loss_fn, "pop_metrics", None)
            if loss.pop_metrics is None:
                del loss.pop_metrics
            else:
                loss.pop_metrics()  # drop what training left
            return evaluate_module(forward, self.batches, loss)
        finally:
            engine.train(was_training)  # DeepSpeedEngine.train(mode): back to where training left it
