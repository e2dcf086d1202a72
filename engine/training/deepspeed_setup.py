"""What DeepSpeed is given: its config dict (our keys removed, our defaults added) and layer options."""
from __future__ import annotations

from models.blocks import AttnOptions, LayerOptions, attn_impl

from engine import distributed as D
from engine.config import TrainConfig


def layer_options(cfg: TrainConfig) -> LayerOptions:
    impl = attn_impl(cfg.packing, cfg.use_flash_attn, D.on_gpu())
    return LayerOptions(attn=AttnOptions(packed=cfg.packing, impl=impl), grad_ckpt=cfg.use_grad_ckpt,
                        compile=cfg.compile_blocks)


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
