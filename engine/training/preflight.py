"""The launch's config checks without launching: `--dry-run` runs them (engine/cli.py), so a config
the dry run passes is not refused at launch on config grounds. Each is the function the launch
itself calls (engine/training/loop.py run, the backends, layer_options) on the same config.

What a launch asks of the machine (fp8's FP8 tensor cores and torchao, liger's GPU and package, the
device's bf16/fp16) is judged for this machine where it has a GPU, as the launch here will judge it;
a dry run on a machine without one (a login node) plans for a GPU machine, as engine/plan.py's
report does, and leaves those to the launch there. Not here either: what the launch refuses on
other grounds than the config: the data files' contents (no samples, too few rows for one global
batch, no answer tokens in the eval set), a checkpoint's files, the environment.
tests/test_combinations.py finds every ConfigError the launch path raises and checks that a dry run
reaches it."""
from __future__ import annotations

from engine import distributed as D
from engine.config import TrainConfig, check_paths
from engine.model import Model
from engine.training.backends import check_base_quant, lora_spec
from engine.training.deepspeed_setup import check_device_dtype, check_machine
from engine.training.loop import check_resume_setting
from engine.training.optim import build_optimizer, uses_ds_cpu_optimizer


def check_launch(cfg: TrainConfig, pipeline: bool = True) -> None:
    """Raise what a launch of `cfg` raises before its engine is built, on config grounds (the dry
    run then validates and plans, and checks DeepSpeed's keys, as the launch does next)."""
    check_paths(cfg)
    model = Model.for_training(cfg)
    lora_spec(cfg, model)  # target_modules / modules_to_save against the model, lora.init_from
    if D.on_gpu():  # a GPU here: judged as the launch here will judge it
        check_device_dtype(cfg)
    check_resume_setting(cfg)


def check_build(cfg: TrainConfig, pipeline: bool = True) -> None:
    """Raise what building the launch's model and optimizer raises on config grounds."""
    if D.on_gpu():
        check_machine(cfg, pipeline)  # fp8, kernels: liger (layer_options)
    check_base_quant(cfg)
    if not uses_ds_cpu_optimizer(cfg.ds):  # DeepSpeed's CPU optimizers JIT-compile a C++ op (~1 min) when built
        import torch

        build_optimizer(cfg.ds.get("optimizer"), [("w", torch.nn.Parameter(torch.zeros(2, 2)))], cfg.ds)
