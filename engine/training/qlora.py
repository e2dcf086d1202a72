"""QLoRA's stage building (`lora.base_quant: nf4`; the 4-bit weights themselves: models/quant.py).

Pipeline path: DeepSpeed's PipelineModule builds a stage's layers in fp32 on the host and then
moves the whole stage to its GPU, so loading and quantizing after the build would put the stage's
full-precision block weights on the GPU first (a 70B stage: 280 GB). Instead each transformer
block is built on the training device, loaded (or initialised, from_scratch) and quantized before
the next one is built (build_pipeline's on_block): besides the NF4 weights the device holds one
full-precision block at a time, the host none (the layer files or HF shards are read a layer at a
time). The stage's other layers (embedding, final norm, head) are then loaded or initialised as
load_stage / init_weights do it, so a run's base equals a full-precision run's bitwise outside
the quantized linears. from_scratch (benchmarks): a block's N(0, 0.02) weights come from the
device's own generator, seeded per layer as init_layer seeds (its CPU generator would take minutes
for a 70B model), so they are not init_weights' values.

ZeRO-1/2 path (one SequentialModel): the model is built and loaded whole on the host as in any
ZeRO run, then the blocks are quantized before DeepSpeed moves it to the GPU.
"""
from __future__ import annotations

import torch
from torch import nn

from models.block_base import BlockBase
from models.pipeline import init_layer

from engine import distributed as D
from engine.config import ConfigError, TrainConfig
from engine.checkpoints.weights import open_weights
from engine.model import Model


def check_base_quant(cfg: TrainConfig) -> None:
    """lora.base_quant needs torchao on this machine (the launch and the dry run check it: preflight)."""
    if cfg.lora.base_quant == "none":
        return
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{cfg.source}: lora.base_quant: {cfg.lora.base_quant} needs torchao ({e}); pip install "
                          "torchao") from None


def _device_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """Where the engine will train (the NF4 weights are no parameters: DeepSpeed does not move them)
    and in which dtype the dequantized weights meet the activations."""
    device = torch.device("cuda", torch.cuda.current_device()) if D.on_gpu() else torch.device("cpu")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype, torch.float32)


class BlockLoader:
    """build_pipeline's on_block for an nf4 run: a block's weights (from `weights`: a model dir,
    "scratch" for random init, None for none) and then its frozen linears in NF4."""

    def __init__(self, cfg: TrainConfig, model: Model, spec, weights: str | None):
        check_base_quant(cfg)
        self.cfg, self.model, self.spec, self.weights = cfg, model, spec, weights
        self.source = open_weights(weights, model) if weights not in (None, "scratch") else None
        self.keys = model.family.hf_keys(model.args)
        self.device, self.dtype = _device_dtype(cfg)
        self.quantized = 0

    def _fill(self, layer: nn.Module, idx: int) -> None:
        if self.weights == "scratch":
            init_layer(layer, self.cfg.seed, idx)
        elif self.source is not None:
            layer.load_state_dict(self.source.layer(idx))

    def __call__(self, build, idx: int) -> BlockBase:
        from models.quant import frozen_linears, quantize_block

        with torch.device(self.device):
            block = build()
        if self.weights == "scratch":
            _init_on_device(block, self.cfg.seed, idx, self.device)
        elif self.source is not None:
            block.load_state_dict(self.source.layer(idx))
        names = frozen_linears(self.model.family, self.model.args, self.spec, self.keys[idx])
        self.quantized += quantize_block(block, names, self.device, self.dtype)
        return block

    def rest(self, module) -> None:
        """The stage's other layers, as load_stage / init_weights fill them; tied twins synchronised."""
        for i, layer in enumerate(module.forward_funcs):
            if isinstance(layer, nn.Module) and not isinstance(layer, BlockBase):
                self._fill(layer, module._local_start + i)
        if self.weights is not None:
            module._synchronize_tied_weights()


def _init_on_device(layer: nn.Module, seed: int, idx: int, device: torch.device, std: float = 0.02) -> None:
    """init_layer's scheme (N(0, std) matrices, zero biases, unit norms, seeded by the layer's global
    index) drawn by the device's generator."""
    gen = torch.Generator(device).manual_seed(seed * 100_003 + idx)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std, generator=gen)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)


def quantize_loaded(cfg: TrainConfig, model: Model, spec, layers) -> int:
    """ZeRO-1/2: the frozen linears of these loaded (index, layer) pairs' blocks in NF4."""
    from models.quant import frozen_linears, quantize_block

    check_base_quant(cfg)
    device, dtype = _device_dtype(cfg)
    keys = model.family.hf_keys(model.args)
    return sum(quantize_block(layer, frozen_linears(model.family, model.args, spec, keys[idx]), device, dtype)
               for idx, layer in layers if isinstance(layer, BlockBase))
