"""Mixtral family: llama-style attention (GQA, rope, optional sliding window) with a sparse
mixture-of-experts MLP (top-k routing), Switch-style router load-balancing loss and, optionally,
ST-MoE's router z-loss.

Pipeline layers exchange `(hidden, position_ids, router_stats, router_z, real)`: every MoE block
adds its routing statistics (a [2, experts] fp32 tensor: tokens sent to each expert, summed
router probability per expert) so the aux loss, which transformers computes from all layers'
routing together, travels through the pipeline to the head; likewise its router z-loss (a [1]
fp32 tensor: mean over the real tokens of logsumexp(router logits)^2, averaged over layers).
`real` (int32 [B, S], 1 = not padding) is found once by the embedding. The head returns
`(logits, aux_loss, router_z)` and `make_loss(args)` adds `router_aux_loss_coef * aux_loss +
router_z_loss_coef * router_z` to the LM loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import Dims, llama
from .block_base import BlockBase, LayerDef, LayerOptions, decoder_layers
from .masks import document_ids
from .norm_mlp import RMSNorm
from .old_layouts import accept_old_layout
from .sequence_parallel import gather_positions, group_value, local_slice, sum_over
from .grouped_wgrad import grouped_linear
from .keymap import Fused
from .llama import Attention, attention_keys  # same GQA + rotary attention; the sliding window comes with the mask
from .loss import causal_lm_loss, head_output

MODEL_TYPES = ("mixtral",)
HF_ARCHITECTURE = "MixtralForCausalLM"
TIED_WEIGHTS = ["embed_tokens.weight"]  # shared by embedding and head when tie_word_embeddings
HF_NOT_LINEAR = ("block_sparse_moe.",)  # experts + router are no nn.Linear in transformers 5: no LoRA targets (models/lora.py)
# (our experts are no nn.Linear either: stacked parameters, class Experts; the router is one)


@dataclass(kw_only=True)
class Args(llama.Args):
    """llama's fields (attention and norms are llama's) + the mixture of experts."""

    num_experts: int
    top_k: int
    router_aux_loss_coef: float  # weight of the load-balancing loss (override: dataclasses.replace)
    sliding_window: int | None = None
    # weight of ST-MoE's router z-loss; HF's Mixtral has none, so the training config's
    # `router_z_loss_coef` sets it (engine.model.Model.for_training)
    router_z_loss_coef: float = 0.0

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Args":
        return cls(
            **llama.llama_fields(hf, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096 * 32),
            num_experts=hf.get("num_local_experts", 8),
            top_k=hf.get("num_experts_per_tok", 2),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            sliding_window=hf.get("sliding_window"),
        )


class Embed(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.num_experts = args.num_experts
        self.seq = opts.attn.seq  # the seq axis: router statistics and z-loss are over the whole row

    def forward(self, inputs):
        input_ids, position_ids = inputs
        # requires_grad: DeepSpeed runs backward on every float output of a stage, so the
        # statistics must be part of the graph even on a stage holding only the embedding
        stats = torch.zeros(2, self.num_experts, device=input_ids.device, requires_grad=True)
        z = torch.zeros(1, device=input_ids.device, requires_grad=True)
        if self.seq is None:
            real = real_tokens(input_ids, position_ids)
        else:  # a row's padding is its last segment: found on the whole row, then my slice of it
            real = local_slice(real_tokens(gather_positions(input_ids, self.seq),
                                           gather_positions(position_ids, self.seq)), self.seq)
        return self.embed_tokens(input_ids), position_ids, stats, z, real


def real_tokens(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """1 at real tokens, 0 at padding; int32, as DeepSpeed's pipeline sends no bool tensors.

    A padded row ends in its padding as one more segment (data.packing.layout_row: position ids
    restart at 0 after the last document) holding the pad id repeated. A real document is not
    one token repeated, so a row's last segment is padding exactly when it is uniform (with
    pad = eos, the document's own eos stays in its segment)."""
    doc = document_ids(position_ids)
    tail = doc == doc[:, -1:]
    uniform = ~((input_ids != input_ids[:, -1:]) & tail).any(dim=-1, keepdim=True)
    return (~(tail & uniform)).to(torch.int32)


class Experts(nn.Module):
    """A layer's SwiGLU experts (Mixtral's w2(silu(w1 x) * w3 x)), stored stacked as transformers
    5's MixtralExperts holds them in memory: `gate_up_proj` [E, 2*ffn, h] (rows [w1; w3] of each
    expert, as GatedMLP's gate_up_proj) and `down_proj` [E, h, ffn] (w2). The grouped GEMMs read
    them through transposed views: no copy per forward. On disk (HF) they stay one w1/w2/w3 per
    expert: the key map stacks and splits them (`expert_keys`, keymap.Fused with `stack`), and a
    pipeline checkpoint written before the stacking (`experts.{e}.w1.weight`, ...) is stacked on
    load (state dict hook; optimizer state by name: keymap.unfused_names).

    `forward(x, flat, routed, weights, k)` runs every routed (token, slot) pair through its
    expert. It is the module whose forward reads the expert weights, so ZeRO-3 gathers them
    (all experts, on every rank whatever the routing) in its forward and again for its backward.
    The weights are no nn.Linear: fp8's Float8Linear swap leaves them alone (they run in the
    training dtype) and LoRA does not adapt them (transformers has no linear there either). The
    wgrad fusion does take them (`WGRAD_PARAMS`): with an fp32 `main_grad` attached, the grouped
    weight-gradient GEMMs add into it (models/grouped_wgrad.py), as every block nn.Linear's does.
    """

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        with torch.no_grad():  # nn.Linear's default init, per expert
            self.gate_up_proj.uniform_(-hidden ** -0.5, hidden ** -0.5)
            self.down_proj.uniform_(-ffn ** -0.5, ffn ** -0.5)
        accept_old_layout(self, expert_keys(num_experts, hidden, ffn, prefix=""))

    # the wgrad fusion (models/fused_linear.py fuse_wgrad, engine/training/grad_accum.py link) attaches an
    # fp32 `main_grad` to these; the grouped path then adds their weight gradients straight into it
    WGRAD_PARAMS = ("gate_up_proj", "down_proj")

    def forward(self, x, flat, routed, weights, k: int):
        if grouped_mm(x, self.gate_up_proj):
            main_grads = tuple(getattr(w, "main_grad", None) for w in (self.gate_up_proj, self.down_proj))
            return grouped_experts(x, flat, routed, weights, self.gate_up_proj, self.down_proj, k, main_grads)
        # the loop leaves a fused weight's gradient to DeepSpeed's hook, which adds it into the same fp32 buffer
        return looped_experts(x, flat, routed, weights, self.gate_up_proj, self.down_proj, k)


def expert_keys(num_experts: int, hidden: int, ffn: int, prefix: str = "block_sparse_moe.experts.") -> dict:
    """hf_keys entries of the stacked experts: each the per-expert HF tensors (`{e}.w1.weight`,
    which are also the names our layer files had before the stacking) in memory order: w1, w3 of
    expert 0, w1, w3 of expert 1, ...; w2 of each expert."""
    def names(*ws):
        return tuple(f"{prefix}{e}.{w}.weight" for e in range(num_experts) for w in ws)

    up, down = names("w1", "w3"), names("w2")
    return {f"{prefix}gate_up_proj": Fused(up, (ffn,) * len(up), up, num_experts),
            f"{prefix}down_proj": Fused(down, (hidden,) * len(down), down, num_experts)}


class SparseMoE(nn.Module):
    """Top-k routing with renormalised weights (as transformers' Mixtral). Returns the output,
    this layer's routing statistics [2, experts], per token: routed slots, router probability,
    and each token's router z term logsumexp(router logits)^2 [tokens] (ST-MoE's z-loss, fp32).

    The experts (`Experts`, stored stacked) run as grouped GEMMs (`torch._grouped_mm`): the
    (token, slot) pairs sorted by expert, group ends = cumsum of the routed counts (int32, on the
    device), one grouped GEMM for every expert's [w1; w3] and one for w2. Nothing reads a value
    back to the host, so the step never syncs and a compiled block is one graph.

    Where `_grouped_mm` refuses (a GPU dtype other than bf16, rows not 16-byte aligned), the
    per-expert loop runs instead (`grouped_mm(x, w) is False`, a host-side choice from dtype,
    device and shape) on slices of the same stacked weights: it reads the group sizes back to the
    host once per layer.
    """

    def __init__(self, args: Args):
        super().__init__()
        self.top_k, self.num_experts = args.top_k, args.num_experts
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args.num_experts, args.hidden_size, args.intermediate_size)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, weights, flat, routed = self.route(x)
        out = self.experts(x, flat, routed, weights, self.top_k)
        stats = torch.stack((routed.to(probs.dtype), probs.sum(dim=0))) / x.shape[0]
        return out.view(shape), stats, logits.logsumexp(dim=-1).square()

    def route(self, x):
        """Router logits and probabilities (fp32), the renormalised top-k weights [T, k], the chosen
        expert per (token, slot) [T*k], and the slots per expert [E], counted on the device
        (bincount's output size would depend on the data: a graph break)."""
        logits = self.gate(x).float()
        probs = F.softmax(logits, dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.flatten()
        routed = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        return logits, probs, weights, flat, routed


def looped_experts(x, flat, routed, weights, w13, w2, k: int):
    """grouped_experts one expert at a time, on slices of the stacked weights (the fallback where
    `_grouped_mm` refuses); one host sync for the group sizes. Experts no token chose are skipped
    (their slices of the stacked gradients stay zero)."""
    order = flat.argsort(stable=True)
    out = torch.zeros_like(x)
    for e, pairs in enumerate(order.split(routed.tolist())):
        if not len(pairs):
            continue
        token, slot = pairs // k, pairs % k
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
    return out


def grouped_experts(x, flat, routed, weights, w13, w2, k: int, main_grads=(None, None)):
    """SwiGLU experts as two grouped GEMMs. x [T, h]; flat [T*k] chosen expert per (token, slot);
    routed [E] slots per expert; weights [T, k] fp32 routing weights; w13 [E, 2*ffn, h] (rows
    [w1; w3] per expert), w2 [E, h, ffn]; main_grads: fp32 buffers of w13's and w2's shapes (or None)
    that their weight gradients are added into (models/grouped_wgrad.py). Returns [T, h] in x's dtype."""
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    rows = x.index_select(0, order // k)  # backward: index_add (x[idx]'s index_put may sync on CUDA)
    ends = routed.cumsum(0).to(torch.int32)
    pad = -rows.shape[0] % (16 // x.element_size())  # rows 16-byte aligned (the weight-gradient GEMM reads rows^T)
    if pad:  # zero rows in the last group: zero outputs, zero weight-gradient terms; cut off below
        rows = torch.cat((rows, rows.new_zeros(pad, rows.shape[1])))
        ends = torch.cat((ends[:-1], ends[-1:] + pad))
    gate, up = grouped_linear(rows, w13, ends, main_grads[0]).chunk(2, dim=-1)
    y = grouped_linear(F.silu(gate) * up, w2, ends, main_grads[1])
    if pad:
        y = y[:-pad]
    y = y * weights.flatten().index_select(0, order)[:, None]  # fp32, as the loop's expert(x) * weight
    # back to (token, slot) order, then the top_k slots summed: no atomics, deterministic
    y = y.new_empty(y.shape).index_copy(0, order, y)
    return y.view(x.shape[0], k, x.shape[1]).sum(dim=1).to(x.dtype)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether Experts can run `torch._grouped_mm` on x and its stacked `gate_up_proj` weight
    [E, 2*ffn, h] (host-side: dtype, device, shape). CUDA (torch 2.11, Hopper): bf16 only; every
    dim's stride 16-byte aligned, i.e. hidden and ffn multiples of 8 in bf16 (the token count is
    padded). CPU eager: fp32 and bf16; compiled: bf16 (the op's meta function refuses fp32 whatever
    the device). Weight wrappers (no plain tensor) take the loop."""
    if not hasattr(torch, "_grouped_mm") or type(weight) not in (torch.Tensor, nn.Parameter):
        return False
    if x.dtype != weight.dtype or x.device.type not in ("cuda", "cpu"):
        return False
    if (x.device.type == "cuda" or torch.compiler.is_compiling()) and x.dtype != torch.bfloat16:
        return False  # CUDA kernels and the op's meta function (what compile traces) take bf16 only
    if x.dtype not in (torch.bfloat16, torch.float32):
        return False
    ffn, hidden = weight.shape[-2] // 2, weight.shape[-1]
    return all(n * x.element_size() % 16 == 0 for n in (ffn, hidden))


class Block(BlockBase):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(opts)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, opts.attn)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(args)
        self.window = args.sliding_window
        self.num_layers = args.num_layers

    def block(self, x, position_ids, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, mask, cache)
        moe, stats, z = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + moe, stats, z

    def forward(self, inputs, cache=None):
        x, position_ids, stats, z, real = inputs
        x, layer_stats, layer_z = self.run_block(x, position_ids, cache)
        # stats: mean over (layer, token) rows; z: mean over layers of each layer's real-token mean
        return (x, position_ids, stats + layer_stats / self.num_layers,
                z + real_mean(layer_z, real, self.attn_opts.seq) / self.num_layers, real)


def real_mean(per_token: torch.Tensor, real: torch.Tensor, seq=None) -> torch.Tensor:
    """Mean of a per-token value over the real tokens (0 for a row of padding only).
    seq axis: my tokens' share of the whole rows' mean, times the seq size (the N ranks' values
    average to the whole rows' mean: models.sequence_parallel.group_value)."""
    weight = real.flatten().to(per_token.dtype)
    if seq is None:
        return (per_token * weight).sum() / weight.sum().clamp(min=1)
    count = sum_over(weight.sum(), seq)  # real tokens of the whole rows
    return seq.size * (per_token * weight).sum() / count.clamp(min=1)


def load_balancing_loss(stats: torch.Tensor, seq=None) -> torch.Tensor:
    """transformers' `load_balancing_loss_func`: experts * sum_e (routed slots of e) * (router
    probability of e), both averaged over every (layer, token) row of the micro-batch.
    seq axis: the routed fractions are the whole rows' (the seq group's mean); my term is
    experts * sum_e routed_e * my prob_e, whose mean over the group is the whole rows' loss: its
    value is that mean, its gradient mine (group_value)."""
    routed, prob = stats
    if seq is None:
        return stats.shape[-1] * (routed * prob).sum()
    routed = sum_over(routed, seq) / seq.size
    return group_value(stats.shape[-1] * (routed * prob).sum(), seq)


class FinalNorm(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, inputs):
        x, *rest = inputs
        return self.norm(x), *rest


class Head(FinalNorm):
    """Final norm + lm_head (untied); also turns the routing statistics into the aux loss and
    passes the router z-loss on."""

    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(args, opts)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.seq = opts.attn.seq

    def forward(self, inputs):
        x, _, stats, z, _ = super().forward(inputs)
        chunked = head_output(self, x, self.lm_head.weight)  # head_chunk_tokens: the loss projects per chunk
        return (chunked if chunked is not None else self.lm_head(x), load_balancing_loss(stats, self.seq),
                group_value(z, self.seq))


def tied_logits(embed: Embed, inputs):
    """Head of a tied model: the embedding matrix projects the (already normed) hidden states."""
    x, _, stats, z, _ = inputs
    chunked = head_output(embed, x, embed.embed_tokens.weight)
    return (chunked if chunked is not None else x @ embed.embed_tokens.weight.t(), load_balancing_loss(stats, embed.seq),
            group_value(z, embed.seq))


def layers(args: Args) -> list[list[LayerDef]]:
    return decoder_layers(args.num_layers, Embed, Block, FinalNorm, Head,
                          tied_logits if args.tie_word_embeddings else None)


class MoELoss:
    """`(outputs, (labels, scale)) -> loss`: the causal-LM loss plus coef * router aux loss plus
    z_coef * router z-loss.

    Normalisation: `scale` (= gas * dp / answer tokens of the global batch) turns the LM term
    into this micro-batch's share of the global token mean, cancelling DeepSpeed's averaging of
    micro-batch losses over gas (loss / gas) and of gradients over dp ranks. The aux and z losses
    are already means over their micro-batch's tokens, so they enter with factor 1: DeepSpeed's
    own 1/(gas * dp) averaging then makes the step's objective coef * (mean aux over micro-batches
    and ranks), which is what transformers optimises per batch. Scaling them by `scale` would
    weight them by batch size instead.

    `pop_metrics()` returns the LM and aux terms (and `router_z_loss` when z_coef > 0) summed
    over the micro-batches seen by this rank since the last pop (divide by their number for the
    step mean; only the last pipeline stage computes losses, other stages return zeros).
    """

    def __init__(self, coef: float, z_coef: float = 0.0):
        self.coef, self.z_coef = coef, z_coef
        self._sums: torch.Tensor | None = None

    def __call__(self, outputs, target) -> torch.Tensor:
        logits, aux, z = outputs
        lm, z = causal_lm_loss(logits, target), z.sum()
        terms = torch.stack((lm.detach().float(), aux.detach().float(), z.detach().float()))
        self._sums = terms if self._sums is None else self._sums + terms
        # z is in the graph even at z_coef 0: the pipeline sends a gradient for every float activation
        return lm + self.coef * aux.to(lm.dtype) + self.z_coef * z.to(lm.dtype)

    def pop_metrics(self) -> dict[str, float]:
        lm, aux, z = self._sums.tolist() if self._sums is not None else (0.0, 0.0, 0.0)
        self._sums = None
        return {"lm_loss": lm, "aux_loss": aux, **({"router_z_loss": z} if self.z_coef else {})}


def make_loss(args: Args) -> MoELoss:
    return MoELoss(args.router_aux_loss_coef, args.router_z_loss_coef)


def hf_keys(args: Args) -> list[dict]:
    """Per pipeline layer: {our parameter name: HF checkpoint key or Fused} (the on-disk names,
    with one w1/w2/w3 per expert, stacked into our [experts, ...] tensors: `expert_keys`; our q/k/v
    are one fused projection, models/keymap.py)."""
    block = {k: k for k in ["input_layernorm.weight", "post_attention_layernorm.weight", "block_sparse_moe.gate.weight"]}
    block.update(expert_keys(args.num_experts, args.hidden_size, args.intermediate_size))
    block.update(attention_keys(args))
    return llama.decoder_keys(args, block)


def dims(args: Args) -> Dims:
    return dataclasses.replace(llama.dims(args), experts=args.num_experts, top_k=args.top_k, window=args.sliding_window)


def tiny_hf_config(**overrides) -> dict:
    """A tiny random config for tests and the quickstart (GQA, 4 experts, top-2)."""
    cfg = dict(
        model_type="mixtral", architectures=[HF_ARCHITECTURE], vocab_size=320, hidden_size=64,
        intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg
