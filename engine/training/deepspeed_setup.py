"""What DeepSpeed is given: its config dict (our keys removed, our defaults added) and layer options."""
from __future__ import annotations

import sys

from models.attention import AttnOptions, attn_impl
from models.block_base import LayerOptions

from engine import distributed as D
from engine.config import SCHEDULER_TOTAL, ConfigError, TrainConfig


def layer_options(cfg: TrainConfig, pipeline: bool = True, seq=None) -> LayerOptions:
    """seq: the rank's models.sequence_parallel.SeqGroup (the seq axis; None without one)."""
    impl = attn_impl(cfg.packing, cfg.use_flash_attn, D.on_gpu())
    fp8 = check_machine(cfg, pipeline, say=True)
    return LayerOptions(attn=AttnOptions(packed=cfg.packing, impl=impl, seq=seq), grad_ckpt=cfg.use_grad_ckpt,
                        compile=cfg.compile_blocks, max_z_loss=cfg.max_z_weight, fp8=fp8,
                        fp8_head=cfg.fp8_head and fp8 != "off", kernels=cfg.kernels,
                        offload=cfg.offload_activations, head_chunk=cfg.head_chunk_tokens)



def check_machine(cfg: TrainConfig, pipeline: bool = True, say: bool = False) -> str:
    """What fp8 and kernels need from this machine (check_fp8, check_liger), as layer_options and the
    dry run (engine/training/preflight.py) check it; returns the fp8 recipe the run uses."""
    fp8 = resolved_fp8(cfg, say=say, pipeline=pipeline)
    if fp8 != "off":
        check_fp8(cfg)
    if cfg.kernels == "liger":
        check_liger(cfg)
    return fp8


_SAID: set = set()


def resolved_fp8(cfg: TrainConfig, say: bool = False, pipeline: bool = True, dims=None) -> str:
    """The recipe `fp8` means on this machine: `auto` (the default) is tensorwise only where fp8 was
    measured faster at this shape (engine/plan.py fp8_auto: bf16 run, pipeline path, compiled blocks,
    FP8_SPEEDUP by hidden size and micro-batch) and it can run here (a GPU of compute capability >= 8.9,
    torchao importable), off (bf16) elsewhere (say=True: one note line which and why, once per run);
    any other value is itself (check_fp8 refuses one that cannot run). dims: the model's models.Dims
    (None: read from model_path's config.json when the decision gets to the shape)."""
    if cfg.fp8 != "auto":
        return cfg.fp8
    import torch

    from engine.plan import fp8_auto

    def machine() -> str | None:
        if not (D.on_gpu() and torch.cuda.get_device_capability() >= (8, 9)):
            return "no GPU with FP8 tensor cores (compute capability >= 8.9)"
        try:
            import torchao.float8  # noqa: F401
        except ImportError:
            return "torchao is not installed (pip install torchao)"
        return None

    fp8, why = fp8_auto(cfg, dims if dims is not None else (lambda: _model_dims(cfg)), pipeline, machine)
    if say and cfg.dtype == "bf16" and "fp8" not in _SAID and D.rank() == 0:  # fp32/fp16 runs never weigh fp8
        _SAID.add("fp8")
        print(f"note: fp8: auto -> {'tensorwise' if fp8 else 'off (bf16)'}: {why}", file=sys.stderr, flush=True)
    return "tensorwise" if fp8 else "off"


def _model_dims(cfg: TrainConfig):
    from engine.model import Model

    return Model.from_dir(cfg.model_path).dims


def check_liger(cfg: TrainConfig) -> None:
    """What `kernels: liger` needs from this machine: liger-kernel and a GPU (its kernels are Triton)."""
    try:
        import liger_kernel.ops  # noqa: F401
    except ImportError:
        raise ConfigError(f"{cfg.source}: kernels: liger needs liger-kernel (pip install liger-kernel); "
                          f"set kernels: inductor") from None
    if not D.on_gpu():
        raise ConfigError(f"{cfg.source}: kernels: liger needs a GPU (liger's kernels are Triton); "
                          f"set kernels: inductor")


def check_fp8(cfg: TrainConfig) -> None:
    """What `fp8` needs from this machine (validate checked the value): torchao and FP8 tensor cores.
    (`auto` never fails here: resolved_fp8 turned it off where it cannot run.)"""
    import torch

    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError(f"{cfg.source}: fp8: {cfg.fp8} needs torchao (pip install torchao); set fp8: off") from None
    if not (D.on_gpu() and torch.cuda.get_device_capability() >= (8, 9)):
        raise ConfigError(f"{cfg.source}: fp8: {cfg.fp8} needs a GPU with FP8 tensor cores (compute capability "
                          f">= 8.9: H100, H200, L40, RTX 4090); set fp8: off")


def wrapped_optimizer(cfg: TrainConfig) -> bool:
    """Whether DeepSpeed wraps the optimizer (bf16/fp16/ZeRO: it then clips and records the norm)."""
    return cfg.dtype != "fp32" or cfg.ds.get("zero_optimization", {}).get("stage", 0) > 0


def deepspeed_config(cfg: TrainConfig, pipeline: bool = True) -> dict:
    """DeepSpeed's keys minus the optimizer (we pass a client optimizer, see engine.training.optim)."""
    ds = {k: v for k, v in cfg.ds.items() if k != "optimizer"}
    if pipeline and cfg.bf16_grad_accum == "fp32" and "data_types" not in ds:
        # fp32 gradient accumulation (DeepSpeed's BF16_Optimizer), each gradient added into the fp32
        # buffer as soon as backward produces it and then freed (immediate_grad_update): 2.9% slower
        # than bf16 accumulation on an H200 but exact over any number of micro-batches, and the
        # bf16 gradients never pile up (bench/README.md).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["bf16"] = {"immediate_grad_update": True, **ds["bf16"]}
    if not wrapped_optimizer(cfg):
        ds.pop("gradient_clipping", None)  # done by GlobalGradClip instead
    if ds.get("zero_optimization", {}).get("stage", 0) != cfg.zero_stage:
        # bf16 at stage 0: DeepSpeed's stage-0 bf16 optimizer partitions fp32 master weights over
        # data-parallel ranks but checkpoints only rank 0's share, and cannot load it back
        # (KeyError 0). ZeRO-1 keeps the same memory layout and saves every share.
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": cfg.zero_stage}
    ds.setdefault("steps_per_print", 10**9)  # our own metrics replace DeepSpeed's prints
    if ds.get("zero_optimization", {}).get("stage", 0) > 0 or "Lion" == cfg.ds.get("optimizer", {}).get("type"):
        ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def fill_schedule(cfg: TrainConfig, total_steps: int) -> None:
    """Scheduler params that depend on the run: total_num_steps (WarmupDecayLR, WarmupCosineLR)
    left unset in the config is the run's step count (gdGPT computed it the same way)."""
    sched = cfg.ds.get("scheduler")
    if sched and sched.get("type") in SCHEDULER_TOTAL and "total_num_steps" not in sched["params"]:
        sched["params"]["total_num_steps"] = max(int(total_steps), 1)


# DeepSpeed's pydantic config models -> the config key they parse (for one-line errors)
_DS_SECTIONS = {"DeepSpeedFP16Config": "fp16", "DeepSpeedBF16Config": "bf16", "DeepSpeedZeroConfig": "zero_optimization",
                "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
                "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
                "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing"}


def check_device_dtype(cfg: TrainConfig) -> None:
    """DeepSpeed refuses a precision the device lacks only deep inside initialize (fp16 on CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}.get(cfg.dtype)
    if supported is not None and not supported():
        raise ConfigError(f"{cfg.source}: {cfg.dtype} is not supported on this device (DeepSpeed's "
                          f"{acc.device_name()} accelerator): set {cfg.dtype}.enabled: false, or another precision")


def check_deepspeed(cfg: TrainConfig, pipeline: bool = True, total_steps: int | None = None) -> None:
    """What DeepSpeed will be given, checked by DeepSpeed's own config classes without launching:
    the resolved config dict (DeepSpeedConfig, its pydantic sections included) and the scheduler,
    built on a stand-in optimizer. A rejection becomes one ConfigError line; cfg is not changed.
    Run by --dry-run and by every launch before anything is built."""
    import copy
    import logging
    import types

    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from deepspeed.utils import logger
    from pydantic import ValidationError

    from engine.training.optim import optimizer_param_names

    known = optimizer_param_names(cfg.ds.get("optimizer"), cfg.ds)
    unknown = sorted(set((cfg.ds.get("optimizer") or {}).get("params") or {}) - (known or set()))
    if known is not None and unknown:  # our optimizer takes these, not DeepSpeed: a typo would fail at build
        raise ConfigError(f"{cfg.source}: unknown key 'optimizer.params.{unknown[0]}' ({cfg.ds['optimizer'].get('type', 'AdamW')} "
                          f"takes {', '.join(sorted(known))})")
    ds = copy.deepcopy(deepspeed_config(cfg, pipeline))
    # DeepSpeedConfig checks the batch triple against the data-parallel size it finds: the grid's
    # (as the engine passes it) under a launcher, 1 without one; ours was checked by validate
    dp = cfg.data_dim if dist.is_initialized() else 1
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp
    grid = types.SimpleNamespace(get_data_parallel_world_size=lambda: dp)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(ds, mpu=grid)
    except ValidationError as e:
        err = e.errors()[0]
        section = _DS_SECTIONS.get(e.title, e.title)
        key = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{cfg.source}: DeepSpeed rejects {section}.{key}: {err['msg']}") from None
    except (AssertionError, ValueError, DeepSpeedConfigError) as e:
        raise ConfigError(f"{cfg.source}: DeepSpeed rejects the config: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        logger.setLevel(level)
    sched = copy.deepcopy(ds.get("scheduler"))
    if not sched:
        return
    kind, params = sched.get("type"), dict(sched.get("params") or {})
    if kind in SCHEDULER_TOTAL and "total_num_steps" not in params:
        params["total_num_steps"] = max(total_steps or 1, 1)  # filled from the data at launch
    cls = getattr(lr_schedules, str(kind), None) or getattr(torch.optim.lr_scheduler, str(kind), None)
    if not isinstance(cls, type):
        raise ConfigError(f"{cfg.source}: scheduler.type {kind!r} is neither a DeepSpeed nor a torch scheduler "
                          f"(DeepSpeed's: {', '.join(lr_schedules.VALID_LR_SCHEDULES)})")
    lr = cfg.ds["optimizer"]["params"]["lr"]
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    try:
        logger.setLevel(logging.ERROR)
        cls(stand_in, **params)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"{cfg.source}: scheduler {kind}: {str(e).splitlines()[0]}") from None
    finally:
        logger.setLevel(level)
