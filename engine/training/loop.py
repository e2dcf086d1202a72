"""The training loop shared by train_ds.py (pipeline) and train_ds_zero.py (ZeRO-1/2/3).

One global step = the loader's micro-batches for that step, run by a backend (engine/training/backends.py):
the pipeline's `engine.train_batch`, or forward/backward per micro-batch under ZeRO. Data, loss
normalisation, metrics, checkpoints and resume are this module's and the same for both. The
loader is a pure function of (seed, step), so resuming at step k replays exactly what an
uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import distributed as D
from engine import fault_hooks
from engine.checkpoints import lock as runlock
from engine.checkpoints import tags as ckpt
from engine.checkpoints import writes
from engine.checkpoints.files import resolve_tag
from engine.checkpoints.lora import init_adapters
from engine.config import ConfigError, TrainConfig, check_paths
from engine.model import Model, load_tokenizer
from engine.training.backends import PipelineBackend, ZeroBackend
from engine.training.control import NonFiniteLoss, RunControl, watch_launcher
from engine.training.deepspeed_setup import check_deepspeed, check_device_dtype, fill_schedule
from engine.training.evaluate import Evaluator
from engine.training.metrics import PEAK_FLOPS, Metrics, flops_per_token, quiet_prints, setup_logging
from engine.training.profiling import profiled_step


@dataclass
class RunResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss
    final_step: int = 0
    checkpoint: Path | None = None
    interrupted: bool = False  # stopped early by SIGTERM/SIGINT (after saving)


def build_data(cfg: TrainConfig, model: Model, dp_rank: int, dp_size: int, seq_rank: int = 0, seq_size: int = 1):
    from data.dataset import build_dataset
    from data.loader import StepLoader

    tokenizer = load_tokenizer(model.hf_dir)
    dataset = build_dataset(cfg.data_path, tokenizer, cfg.max_seq_len, weights=cfg.data_weights,
                            packing=cfg.packing, skip_bad_samples=cfg.skip_bad_samples, template=cfg.prompt_template,
                            cache_dir=cfg.cache_dir or str(Path(cfg.save_path) / "data_cache"), seed=cfg.seed)
    for i, stats in enumerate(dataset.stats.get("files", [])):
        if stats.get("samples", 1) == 0 and not stats.get("skipped"):
            raise ConfigError(f"{cfg.source}: data_path[{i}] {stats['path']}: no samples (empty file?)")
    loader = StepLoader(dataset, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, cfg.seed, cfg.n_epochs,
                        seq_rank=seq_rank, seq_size=seq_size)
    if loader.steps_per_epoch < 1:
        raise ConfigError(f"{cfg.source}: {len(dataset)} training rows cannot fill one global batch of "
                          f"{cfg.ds['train_batch_size'] // seq_size} rows")
    return dataset, loader


def train(cfg: TrainConfig) -> RunResult:
    """Train a pipeline model as `cfg` says (train_ds.py), resuming from save_path when it holds a checkpoint."""
    return run(cfg, PipelineBackend)


def train_zero(cfg: TrainConfig) -> RunResult:
    """Train the whole model as one module under ZeRO-1/2/3 (train_ds_zero.py); same data, loss,
    metrics and checkpoints as `train`."""
    return run(cfg, ZeroBackend)


def run(cfg: TrainConfig, backend_cls) -> RunResult:
    """The training loop; `backend_cls(cfg, model)` says how one global step runs (engine/training/backends.py)."""
    check_paths(cfg)
    model = Model.for_training(cfg)
    setup_logging()
    runlock.refuse_if_held_here(cfg.save_path)  # a second launch here must not reach the first one's rendezvous
    D.init_distributed()
    backend = backend_cls(cfg, model)  # validates cfg for its path
    cfg = backend.cfg  # with what the backend resolved (parts: auto)
    check_deepspeed(cfg, pipeline=backend.kind == "pipeline")  # DeepSpeed's own keys, before anything is built
    check_device_dtype(cfg)
    check_resume_setting(cfg)
    resume = cfg.resume is True or (cfg.resume == "auto" and ckpt.has_checkpoint(cfg.save_path))
    lock = runlock.take(cfg.save_path)  # one run per save_path, taken before anything is written
    stop_watching = watch_launcher()  # the deepspeed launcher killed alone: save and stop, not train on
    try:
        return _train(cfg, model, backend, resume)
    finally:
        stop_watching()
        if lock is not None:
            lock.release()


def check_resume_setting(cfg: TrainConfig) -> None:
    """`resume: true` needs a checkpoint in save_path (also checked by the dry run)."""
    if cfg.resume is True and not ckpt.has_checkpoint(cfg.save_path):
        raise ConfigError(f"{cfg.source}: resume is true but {cfg.save_path} has no checkpoint")


def _train(cfg: TrainConfig, model: Model, backend, resume: bool) -> RunResult:
    dataset, loader = build_data(cfg, model, backend.dp_rank, backend.dp_size,  # bad data fails before allocation
                                 backend.seq_rank, backend.seq_size)
    from_tag = resume and ckpt.weights_from_tag(cfg, model.name, model.n_layers, backend.kind)  # files checked
    total = min(loader.total_steps, cfg.max_steps) if cfg.max_steps else loader.total_steps
    fill_schedule(cfg, total)  # e.g. total_num_steps: the run's step count

    torch.manual_seed(cfg.seed)
    adapters = None
    if from_tag and backend.lora:  # LoRA: the frozen base from model_path, the adapters from the tag
        weights, adapters = "scratch" if cfg.from_scratch else cfg.model_path, resolve_tag(cfg.save_path)
    elif from_tag:  # weights from the tag's layer files (fp32 masters), optimizer state in ckpt.resume
        weights = cfg.save_path
    else:  # an older tag without optim/: DeepSpeed's own load fills the weights
        weights = None if resume else "scratch" if cfg.from_scratch else cfg.model_path
    if not resume and backend.lora and cfg.lora.init_from:  # trained adapters to go on from, a fresh optimizer
        adapters = init_adapters(cfg, backend.lora, model)
    with quiet_prints():  # DeepSpeed's bare INFO prints (SEED_LAYERS=..., Using topology: ...)
        engine = backend.build(weights, adapters)
    evaluator = Evaluator.maybe(cfg, model.hf_dir, engine)  # held-out set (eval_data_path), if any
    is_logger = D.rank() == 0
    if is_logger:
        Path(cfg.save_path).mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(Path(cfg.save_path), print if is_logger else (lambda _: None))
    step = ckpt.resume(engine, cfg, model.name, model.n_layers, backend.kind) if resume else 0

    metrics_log = Metrics(cfg.save_path, total, step, enabled=is_logger)
    metrics_log.message(f"model {model.name}: {model.n_layers} pipeline layers, {backend.describe()}; data: "
                        f"{dataset.stats}; {total} steps ({loader.steps_per_epoch}/epoch)"
                        + (f", resumed at step {step}" if step else ""))
    fpt = flops_per_token(model.dims, model.n_params(), cfg.max_seq_len)
    result, start = RunResult(final_step=step), step
    fault_hooks.wrap_loss(backend.loss_owner, lambda: step + 1)

    def save():
        if is_logger:  # the new tag is written before older ones are rotated out
            writes.warn_if_short(cfg.save_path, *_expected_tag_size(cfg.save_path, model.n_params()),
                                 metrics_log.message)
        return ckpt.save(engine, cfg, step, model.name, model.n_layers, model.hf_dir, backend.kind,
                         log=metrics_log.message)

    control = RunControl(cfg.save_every_minutes, is_logger)
    try:
        while step < total:
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed + step)  # dropout streams independent of where we resumed
            with profiled_step(cfg.save_path, step + 1, D.rank()) if step + 1 == cfg.profile_step else nullcontext():
                loss = backend.train_step(loader.micro_batches(step))
            dt = time.perf_counter() - t0
            step += 1
            skipped = not engine.was_step_applied() or not math.isfinite(loss)
            result.losses[step] = loss
            tokens = loader.tokens(step - 1)
            tok_s_gpu = tokens / dt / D.world_size()
            record = {"step": step, "epoch": (step - 1) // loader.steps_per_epoch, "loss": loss,
                      "lr": engine.get_lr()[0], "grad_norm": backend.grad_norm(), "tokens": tokens,
                      "tokens_per_s": tokens / dt, "tokens_per_s_per_gpu": tok_s_gpu,
                      "mfu": tok_s_gpu * fpt / PEAK_FLOPS, "step_time_s": dt}
            record.update(backend.loss_metrics())
            if evaluator is not None and evaluator.due(step, total):
                record.update(evaluator.run(engine))
            if skipped:
                record["skipped"] = True
            metrics_log.log(record)
            if skipped and cfg.on_nonfinite_loss == "stop":
                raise NonFiniteLoss(f"step {step}: loss is {loss}; its update was not applied; stopping (set "
                                    f"on_nonfinite_loss: skip to go on; the last checkpoint is kept)")
            fault_hooks.hold_after_step(cfg.save_path, step, lambda: control.received)
            stop, timed = control.poll()
            if (stop or timed or cfg.save_every_steps and step % cfg.save_every_steps == 0) and step < total:
                result.checkpoint = save()
                control.saved()
            if stop:
                metrics_log.message(f"{control.signal or 'signal'} received: saved {result.checkpoint} at step "
                                    f"{step}; run the same command to resume")
                result.interrupted = True
                break
        if cfg.save_at_end and step > start and (result.checkpoint is None or ckpt.tag_step(result.checkpoint.name) != step):
            result.checkpoint = save()
    finally:
        control.restore()
        metrics_log.close()
    result.final_step = step
    return result


def _expected_tag_size(save_path: str, n_params: int) -> tuple[int, str]:
    """(bytes, what that is based on) of the next checkpoint tag: the size of the one `latest`
    names, or about 12 bytes per parameter (fp32 master + two AdamW moments) before the first."""
    try:
        tag = (Path(save_path) / "latest").read_text().strip()
        if tag and (Path(save_path) / tag).is_dir():
            return writes.tag_bytes(Path(save_path) / tag), f"the size of {tag}"
    except OSError:
        pass
    return 12 * n_params, "about 12 bytes per parameter"
