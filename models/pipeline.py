"""Assemble a family's layers into a DeepSpeed PipelineModule (or one plain nn.Module).

`parts` counts user-visible layers (embedding = 1, each block = 1, final norm + head = 1); a
family may realise one of them as several internal layers (tied head = norm + tied twin), so
parts are translated into internal layer boundaries here.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from .attention import options_for_head_dim
from .block_base import BlockBase, LayerDef, LayerOptions
from .chunked_loss import ChunkSpec
from .loss import MaxZLoss, causal_lm_loss, liger_causal_lm_loss


def layer_groups(family: ModuleType, args) -> list[list[LayerDef]]:
    return family.layers(args)


def flat_layers(family: ModuleType, args) -> list[LayerDef]:
    return [d for group in layer_groups(family, args) for d in group]


def balanced_parts(n_layers: int, n_stages: int) -> list[int]:
    """Even split of user layers; the remainder goes to the middle stages, since the first and
    last stages also carry the embedding and the head."""
    base, extra = divmod(n_layers, n_stages)
    parts = [base] * n_stages
    order = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))
    for s in order[:extra]:
        parts[s] += 1
    return parts


def stage_bounds(family: ModuleType, args, parts: list[int]) -> list[int]:
    """Internal layer index where each stage starts (+ the end), from user-level parts."""
    sizes = [len(g) for g in layer_groups(family, args)]
    if sum(parts) != len(sizes):
        raise ValueError(f"model_topo.parts sums to {sum(parts)} but the model has {len(sizes)} pipeline layers "
                         f"(embedding + {len(sizes) - 2} blocks + head)")
    bounds, g = [0], 0
    for p in parts:
        bounds.append(bounds[-1] + sum(sizes[g:g + p]))
        g += p
    return bounds


def make_loss(family: ModuleType, args):
    """The family's loss (an MoE adds its router loss) or the plain causal-LM loss.

    A family's `make_loss(args)` returns a callable `(outputs, (labels, scale)) -> loss`; it
    may also have `pop_metrics() -> dict[str, float]` (summed since the last call) that the
    training loop logs each step.
    """
    return family.make_loss(args) if hasattr(family, "make_loss") else causal_lm_loss


def liger_loss(family: ModuleType, opts: LayerOptions) -> bool:
    """kernels: liger fuses head + cross-entropy when the loss is the plain causal-LM loss on logits
    (no family loss of its own, no max-z term, which needs the logits)."""
    return opts.kernels == "liger" and not hasattr(family, "make_loss") and opts.max_z_loss <= 0


def training_loss(family: ModuleType, args, opts: LayerOptions):
    """make_loss, compiled with the blocks on GPU (fused cross-entropy: no fp32 copy of the logits);
    plus gdGPT's max-z term when opts.max_z_loss > 0. kernels: liger: liger's fused linear
    cross-entropy (not compiled: its own Triton kernels), for heads that hand over HeadInput."""
    if liger_loss(family, opts):
        return liger_causal_lm_loss
    loss = make_loss(family, args)
    # head_chunk: each chunk's projection + cross-entropy is compiled instead (models/chunked_loss.py)
    if opts.compile and torch.cuda.is_available() and not hasattr(loss, "pop_metrics") and not opts.head_chunk:
        loss = torch.compile(loss)
    return MaxZLoss(loss, opts.max_z_loss) if opts.max_z_loss > 0 else loss


def build_pipeline(family: ModuleType, args, opts: LayerOptions, topology, parts: list[int], seed: int,
                   wgrad_fusion: bool = False, on_block=None):
    """A PipelineModule with `parts` user layers per stage (DeepSpeed imported lazily).
    wgrad_fusion: the blocks' linears accumulate weight gradients into `main_grad` (wgrad_fused_blocks).
    on_block(build, global index) -> block: builds each of this stage's transformer blocks (`build()`
    makes it as DeepSpeed would), one at a time and before DeepSpeed moves the stage to its device
    (QLoRA builds, loads and quantizes a block there: engine/training/qlora.py BlockLoader)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    opts = options_for_head_dim(opts, family.dims(args).head_dim)  # flex needs head dim >= 16

    class _Pipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):
            stage = self._topo.get_coord(self.global_rank).pipe
            self.parts = bounds
            self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

    def spec(d: LayerDef, idx: int):
        if d.tie is None:
            s = LayerSpec(d.cls, args, opts)
            if on_block is not None and issubclass(d.cls, BlockBase):
                build = s.build
                s.build = lambda log=False: on_block(lambda: build(log), idx)
            return s
        return TiedLayerSpec(d.tie, d.cls, args, opts, forward_fn=d.forward_fn, tied_weight_attr=family.TIED_WEIGHTS)

    bounds = stage_bounds(family, args, parts)
    module = _Pipeline([spec(d, i) for i, d in enumerate(flat_layers(family, args))], topology=topology,
                       loss_fn=training_loss(family, args, opts), seed_layers=True, base_seed=int(seed),
                       partition_method="manual")
    float8_blocks(module.forward_funcs, opts.fp8, head=opts.fp8_head)
    if opts.kernels == "liger":
        liger_blocks(module.forward_funcs, fused_loss=liger_loss(family, opts))
    if wgrad_fusion:
        wgrad_fused_blocks(module.forward_funcs)
    chunked_heads(family, args, [*module.forward_funcs, *module.tied_modules.values()], opts)
    return module


def chunked_heads(family: ModuleType, args, layers, opts: LayerOptions) -> int:
    """head_chunk_tokens: the head layer (or, tied, the embedding whose twin projects) returns
    HeadInput(hidden, weight) with a ChunkSpec, and the loss walks it in chunks (models/chunked_loss.py)
    instead of taking whole [tokens, vocab] logits. The head is the family's last LayerDef; other
    modules of its class (the embedding itself, tied) ignore the flag. Returns the modules switched."""
    if not opts.head_chunk:
        return 0
    spec, head = ChunkSpec(opts.head_chunk, compiled=opts.compile), flat_layers(family, args)[-1].cls
    switched = [m for m in layers if isinstance(m, head)]
    for m in switched:
        m.chunked_loss = spec
    return len(switched)


def wgrad_fused_blocks(layers) -> list[nn.Parameter]:
    """fp32 gradient accumulation fused into the weight-gradient GEMM: each transformer block's
    nn.Linear becomes a models.fused_linear.WgradFusedLinear (same parameters). Returns their
    weights; each behaves as a plain linear until its `main_grad` is attached (the engine points it
    at the optimizer's fp32 gradient buffer). Embedding, norms and head keep the normal path.
    Call before the blocks first run (compile traces the swap). Mixtral's stacked experts
    (models.mixtral.Experts, no nn.Linear) join too: their grouped wgrad adds into `main_grad`."""
    from .fused_linear import fuse_wgrad

    return [w for layer in layers if isinstance(layer, BlockBase) for w in fuse_wgrad(layer)]


def liger_blocks(layers, fused_loss: bool = True) -> int:
    """kernels: liger: the blocks' RMSNorms, SwiGLU MLPs and llama-style rotary run liger-kernel's
    Triton autograd Functions instead of the ops inductor fuses; with fused_loss, a head with a
    `fused_loss` switch (llama's untied Head) returns HeadInput for liger's fused linear
    cross-entropy. The blocks stay compiled around the liger Functions (dynamo traces autograd
    Functions that launch user Triton kernels; liger keeps its scalars fp32 for that). Call before the
    blocks first run (compile traces the swap). Returns the number of modules switched. Families
    whose blocks are not built from these pieces (bloom's LayerNorm/GELU, chatglm's MLP and
    interleaved rotary, baichuan's W_pack rotary) keep their ops there."""
    from .norm_mlp import GatedMLP, RMSNorm
    from .llama import Attention, Head

    n = 0
    for layer in layers:
        if not isinstance(layer, nn.Module):
            continue
        for m in layer.modules():
            if isinstance(m, (RMSNorm, GatedMLP)) and isinstance(layer, BlockBase):
                m.liger = True
            elif isinstance(m, Attention) and isinstance(layer, BlockBase):
                m.liger_rope = True
            elif isinstance(m, Head) and fused_loss:
                m.fused_loss = True
            else:
                continue
            n += 1
    return n


def float8_blocks(layers, mode: str, head: bool = False) -> None:
    """FP8 training (`fp8: tensorwise | rowwise`): torchao.float8 swaps each transformer block's
    linears (q/k/v, o, gate/up, down) for its Float8Linear, which casts inputs, weights and
    gradients to float8 with dynamic scales for the three matmuls and keeps the bf16 parameters
    (checkpoints and the optimizer see no change). Embedding and head stay in bf16, as torchao
    advises for the first and last layers. Call before the blocks first run (compile traces the swap).
    head (fp8_head): the head's `lm_head` linear too, same recipe (an untied head; a tied one
    projects through the embedding's weight and stays bf16). Mixtral's experts are stacked
    parameters, no nn.Linear (models.mixtral.Experts): they stay bf16 grouped GEMMs."""
    if mode == "off":
        return
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(mode)
    dims_ok = lambda m, _: m.in_features % 16 == 0 and m.out_features % 16 == 0  # noqa: E731 (fp8 GEMM shapes)
    for layer in layers:
        if isinstance(layer, BlockBase):
            convert_to_float8_training(layer, config=config, module_filter_fn=dims_ok)
        elif head and isinstance(getattr(layer, "lm_head", None), nn.Linear):
            convert_to_float8_training(layer, config=config, module_filter_fn=lambda m, fqn: fqn == "lm_head"
                                       and dims_ok(m, fqn))


def init_layer(layer: nn.Module, seed: int, idx: int, std: float = 0.02) -> None:
    """HF's init scheme for one layer: N(0, std) matrices and embeddings, zero biases, unit norms;
    seeded by the layer's global index, so every layout (pipeline stages, ZeRO) gets the same weights."""
    gen = torch.Generator().manual_seed(seed * 100_003 + idx)
    for name, p in layer.named_parameters():
        with torch.no_grad():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)


def init_weights(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random init for training from scratch (see init_layer); tied twins are then synchronised
    from their first owner."""
    layers = module.forward_funcs if hasattr(module, "forward_funcs") else list(module._modules.values())
    start = getattr(module, "_local_start", 0)
    for idx, layer in enumerate(layers):
        if isinstance(layer, nn.Module):
            init_layer(layer, seed, start + idx, std)
    if hasattr(module, "_synchronize_tied_weights"):
        module._synchronize_tied_weights()


class SequentialModel(nn.Module):
    """All layers of a family in one module (single process, ZeRO, generation).

    Its state dict keys are `<internal layer index>.<param>`, the same names the pipeline
    checkpoint files hold, so both load from one checkpoint.
    """

    def __init__(self, family: ModuleType, args, opts: LayerOptions = LayerOptions()):
        super().__init__()
        self.defs = flat_layers(family, args)
        opts = options_for_head_dim(opts, family.dims(args).head_dim)  # flex needs head dim >= 16
        shared: dict[str, nn.Module] = {}
        for i, d in enumerate(self.defs):
            module = shared.get(d.tie) or d.cls(args, opts)
            if d.tie is not None:
                shared[d.tie] = module
            self.add_module(str(i), module)
        chunked_heads(family, args, list(self._modules.values()), opts)

    def owned_layers(self) -> list[tuple[int, nn.Module]]:
        """(index, module) of each layer that owns its weights: a tied twin is skipped, as in the
        pipeline checkpoint, where only the first owner has a layer file."""
        seen: set[int] = set()
        out = []
        for i in range(len(self.defs)):
            module = self._modules[str(i)]
            if id(module) not in seen:
                seen.add(id(module))
                out.append((i, module))
        return out

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = (input_ids, position_ids)
        for i, d in enumerate(self.defs):
            layer = self._modules[str(i)]
            x = d.forward_fn(layer, x) if d.forward_fn is not None else layer(x)
        return x
