"""Llama family (also Llama-2/3, Mistral-style GQA, rope scaling): pipeline layers + HF key map.

Pipeline layers exchange `(hidden, position_ids)`; the head returns logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import Dims
from .attention import AttnOptions, attend
from .block_base import BlockBase, LayerDef, LayerOptions, decoder_layers
from .norm_mlp import GatedMLP, RMSNorm, fused_linear, gated_mlp_keys
from .old_layouts import accept_unfused
from .positions import Rotary, apply_rotary, rope_parameters
from .keymap import Fused, with_prefix
from .loss import HeadInput, head_output

MODEL_TYPES = ("llama",)
HF_ARCHITECTURE = "LlamaForCausalLM"
TIED_WEIGHTS = ["embed_tokens.weight"]  # shared by embedding and head when tie_word_embeddings


@dataclass
class Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict
    max_position_embeddings: int
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Args":
        return cls(**llama_fields(hf))


def llama_fields(hf: dict, rms_norm_eps: float = 1e-6, rope_theta: float | None = None,
                 max_position_embeddings: int = 2048) -> dict:
    """Args fields of the llama-style decoder from config.json (mixtral's Args extends them; the
    defaults are what each family's HF config class assumes when a field is absent)."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", rms_norm_eps),
        rope=rope_parameters(hf if rope_theta is None else {"rope_theta": rope_theta, **hf}),
        max_position_embeddings=hf.get("max_position_embeddings", max_position_embeddings),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


class Embed(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)

    def forward(self, inputs):
        input_ids, position_ids = inputs
        return self.embed_tokens(input_ids), position_ids


class Attention(nn.Module):
    liger_rope = False  # kernels: liger (models.pipeline.liger_blocks): liger's rotary kernel in training

    def __init__(self, args: Args, attn: AttnOptions):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.attn = args.num_heads, args.num_kv_heads, d, attn
        self.qkv_sizes = qkv_sizes(args)
        self.qkv_proj = fused_linear(h, self.qkv_sizes, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=args.attention_bias)
        self.rotary = Rotary(d, args.rope, args.max_position_embeddings)
        accept_unfused(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x, position_ids, mask, cache=None):
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)
        if cache is not None:  # generation: q and k are adjacent in qkv, rotated as one tensor (half the kernels)
            qk, v = qkv.split((self.qkv_sizes[0] + self.qkv_sizes[1], self.qkv_sizes[2]), dim=-1)
            qk = qk.view(b, s, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2)
            cos, sin = self.rotary(position_ids, qk.dtype, cache)
            q, k = apply_rotary(qk, cos, sin).split((self.n_heads, self.n_kv), dim=1)
            v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)  # no copy: nothing is kept for backward
            return self.o_proj(attend(q, k, v, mask, self.attn, cache=cache))
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        # v's own copy: attention keeps v for backward, and a view would keep the whole fused q/k/v
        # output alive (+2 GiB on a 7B stage at micro 4); q and k are new tensors after rotary anyway.
        # Without grad (evaluation) nothing is kept: no copy. (torch.compile guards on grad mode.)
        if torch.is_grad_enabled():
            v = v.contiguous()
        v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(position_ids, q.dtype)
        if self.liger_rope:  # llama's half-split layout, cos/sin [B, S, D]; q, k come back as new tensors
            from liger_kernel.ops import LigerRopeFunction
            q, k = LigerRopeFunction.apply(q, k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attend(q, k, v, mask, self.attn, cache=cache))


def qkv_sizes(args) -> tuple[int, int, int]:
    return args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.num_kv_heads * args.head_dim


def attention_keys(args, prefix: str = "self_attn.") -> dict:
    """hf_keys entries of `Attention` (HF: separate q_proj / k_proj / v_proj, and o_proj)."""
    keys = {}
    for kind in ("weight", "bias") if args.attention_bias else ("weight",):
        old = tuple(f"{prefix}{p}_proj.{kind}" for p in "qkv")
        keys[f"{prefix}qkv_proj.{kind}"] = Fused(old, qkv_sizes(args), old)
        keys[f"{prefix}o_proj.{kind}"] = f"{prefix}o_proj.{kind}"
    return keys


class Block(BlockBase):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(opts)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, opts.attn)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.mlp_bias)

    def block(self, x, position_ids, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class FinalNorm(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, inputs):
        x, position_ids = inputs
        return self.norm(x), position_ids


class Head(FinalNorm):
    """Final norm + lm_head (untied). With `fused_loss` set (kernels: liger, models.pipeline.liger_blocks)
    it returns HeadInput(normed hidden, lm_head weight) and the loss fuses the projection with the
    cross-entropy (no logits)."""

    fused_loss = False

    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(args, opts)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, inputs):
        x, _ = super().forward(inputs)
        if self.fused_loss:
            return HeadInput((x, self.lm_head.weight))
        chunked = head_output(self, x, self.lm_head.weight)  # head_chunk_tokens: the loss projects per chunk
        return chunked if chunked is not None else self.lm_head(x)


def tied_logits(embed: Embed, inputs):
    """Head of a tied model: the embedding matrix projects the (already normed) hidden states."""
    x, _ = inputs
    chunked = head_output(embed, x, embed.embed_tokens.weight)
    return chunked if chunked is not None else x @ embed.embed_tokens.weight.t()


def layers(args: Args) -> list[list[LayerDef]]:
    return decoder_layers(args.num_layers, Embed, Block, FinalNorm, Head,
                          tied_logits if args.tie_word_embeddings else None)


def hf_keys(args: Args) -> list[dict]:
    """Per pipeline layer: {our parameter name: HF checkpoint key, or Fused(HF keys) for the fused
    q/k/v and gate/up projections} (models/keymap.py)."""
    block = {"input_layernorm.weight": "input_layernorm.weight",
             "post_attention_layernorm.weight": "post_attention_layernorm.weight",
             **attention_keys(args), **gated_mlp_keys(args.intermediate_size, args.mlp_bias)}
    return decoder_keys(args, block)


def decoder_keys(args, block: dict) -> list[dict]:
    """The llama layout's key map around one block's entries (mixtral's too): embedding, blocks
    under model.layers.<i>., final norm + lm_head (or the embedding's twin when tied)."""
    keys = [{"embed_tokens.weight": "model.embed_tokens.weight"}]
    keys += [with_prefix(block, f"model.layers.{i}.") for i in range(args.num_layers)]
    if args.tie_word_embeddings:
        keys += [{"norm.weight": "model.norm.weight"}, {"embed_tokens.weight": "model.embed_tokens.weight"}]
    else:
        keys += [{"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}]
    return keys


def dims(args: Args) -> Dims:
    return Dims(hidden=args.hidden_size, heads=args.num_heads, kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                ffn=args.intermediate_size, gated=True, n_layers=args.num_layers, vocab=args.vocab_size,
                norm_eps=args.rms_norm_eps, positional="rope", max_positions=args.max_position_embeddings,
                tied=args.tie_word_embeddings)


def tiny_hf_config(**overrides) -> dict:
    """A tiny random config for tests and the quickstart (GQA and rope scaling on)."""
    cfg = dict(
        model_type="llama", architectures=[HF_ARCHITECTURE], vocab_size=320, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg
