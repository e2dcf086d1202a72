"""The launch's config checks without launching: `--dry-run` runs them (engine/cli.py), so a config
the dry run passes is not refused at launch on config grounds. Each is the function the launch
itself calls (engine/training/loop.py run, the backends, layer_options), given the same config and
judging this machine as the launch here would (fp8 and liger need its GPU). What the launch refuses
on other grounds is not here: the data files' contents (no samples, too few rows for one global
batch, no answer tokens in the eval set), a checkpoint's files, the environment.
tests/test_combinations.py finds every ConfigError the launch path raises and checks that the dry
run reaches it."""
from __future__ import annotations

from engine import distributed as D
from engine.config import TrainConfig, check_paths
from engine.model import Model
from engine.plan import check_dense_attention, check_seq
from engine.training.backends import check_base_quant, lora_spec
from engine.training.deepspeed_setup import check_device_dtype, check_machine
from engine.training.loop import check_resume_setting
from engine.training.optim import build_optimizer, uses_ds_cpu_optimizer


def check_launch(cfg: TrainConfig, pipeline: bool = True) -> None:
    """Raise what a launch of `cfg` on this machine would raise before training, on config grounds."""
    check_paths(cfg)
    model = Model.for_training(cfg)
    gpu = D.on_gpu()  # as the launch judges attention and seq (the dry run's plan judges as for a GPU too)
    check_seq(cfg, model.family, model.args, gpu=gpu)
    check_dense_attention(cfg, model.family, model.args, gpu=gpu)
    lora_spec(cfg, model)  # target_modules / modules_to_save against the model, lora.init_from
    check_machine(cfg, pipeline)  # fp8, kernels: liger
    check_device_dtype(cfg)
    check_base_quant(cfg)
    check_resume_setting(cfg)
    if not uses_ds_cpu_optimizer(cfg.ds):  # DeepSpeed's CPU optimizers JIT-compile a C++ op (~1 min) when built
        import torch

        build_optimizer(cfg.ds.get("optimizer"), [("w", torch.nn.Parameter(torch.zeros(2, 2)))], cfg.ds)
