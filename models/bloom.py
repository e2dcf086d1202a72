"""Bloom family: ALiBi attention with a fused, head-interleaved query_key_value, LayerNorm
everywhere (also right after the word embeddings), tanh-GELU MLP, lm_head tied to the embeddings.

Pipeline layers exchange `(hidden, position_ids)`; the head returns logits. The embedding's
LayerNorm is its own internal layer (in the embedding's `parts` slot), so the module tied
between the first and last stage holds only the word embeddings: no stage owns an unused copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from . import Dims
from .attention import AttnOptions, attend
from .block_base import BlockBase, LayerDef, LayerOptions, decoder_layers
from .loss import head_output
from .positions import alibi_bias, alibi_slopes

MODEL_TYPES = ("bloom",)
HF_ARCHITECTURE = "BloomForCausalLM"
HF_BASE_PREFIX = "transformer."  # bigscience's hub checkpoints store the base model's keys without it
TIED_WEIGHTS = ["word_embeddings.weight"]  # shared by embedding and head when tie_word_embeddings


@dataclass
class Args:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    residual_post_layernorm: bool = False  # apply_residual_connection_post_layernorm
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Args":
        # bloom's own names (n_layer, n_head, old n_embed) and the generic aliases both occur on the hub
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf.get("hidden_size") or hf["n_embed"],
            num_layers=hf.get("n_layer") or hf["num_hidden_layers"],
            num_heads=hf.get("n_head") or hf["num_attention_heads"],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            residual_post_layernorm=hf.get("apply_residual_connection_post_layernorm", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )


class Embed(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)

    def forward(self, inputs):
        input_ids, position_ids = inputs
        return self.word_embeddings(input_ids), position_ids


class EmbedNorm(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.word_embeddings_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def forward(self, inputs):
        x, position_ids = inputs
        return self.word_embeddings_layernorm(x), position_ids


class Attention(nn.Module):
    def __init__(self, args: Args, attn: AttnOptions):
        super().__init__()
        h = args.hidden_size
        self.n_heads, self.head_dim, self.attn = args.num_heads, h // args.num_heads, attn
        self.query_key_value = nn.Linear(h, 3 * h)  # HF layout: rows grouped per head as [q | k | v]
        self.dense = nn.Linear(h, h)
        self.slopes = alibi_slopes(self.n_heads)  # fp32 always (not a buffer: a bf16 cast would round it)

    def forward(self, x, position_ids, mask, cache=None):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.n_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        bias = alibi_bias(self.slopes, position_ids, cache)  # per-document distances: positions restart per document
        return self.dense(attend(q, k, v, mask, self.attn, bias=bias, cache=cache))


class MLP(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, 4 * args.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * args.hidden_size, args.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(BlockBase):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(opts)
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attention = Attention(args, opts.attn)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args)
        self.residual_post_layernorm = args.residual_post_layernorm

    def block(self, x, position_ids, mask, cache=None):
        h = self.input_layernorm(x)
        x = (h if self.residual_post_layernorm else x) + self.self_attention(h, position_ids, mask, cache)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_post_layernorm else x) + self.mlp(h)


class FinalNorm(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.ln_f = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def forward(self, inputs):
        x, position_ids = inputs
        return self.ln_f(x), position_ids


class Head(FinalNorm):
    """Final norm + lm_head (untied)."""

    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(args, opts)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, inputs):
        x, _ = super().forward(inputs)
        chunked = head_output(self, x, self.lm_head.weight)  # head_chunk_tokens: the loss projects per chunk
        return chunked if chunked is not None else self.lm_head(x)


def tied_logits(embed: Embed, inputs):
    """Head of a tied model: the embedding matrix projects the (already normed) hidden states."""
    x, _ = inputs
    chunked = head_output(embed, x, embed.word_embeddings.weight)
    return chunked if chunked is not None else x @ embed.word_embeddings.weight.t()


def layers(args: Args) -> list[list[LayerDef]]:
    """The embedding's LayerNorm shares the embedding's `parts` slot."""
    tied = tied_logits if args.tie_word_embeddings else None
    return decoder_layers(args.num_layers, Embed, Block, FinalNorm, Head, tied, embed_extra=(EmbedNorm,))


def hf_keys(args: Args) -> list[dict[str, str]]:
    """Per internal pipeline layer: {our parameter name: HF checkpoint key}. The tied twin maps to
    the embedding's key (bloom checkpoints have no lm_head.weight); conversion writes it once."""
    block = [f"{m}.{p}" for m in ("input_layernorm", "post_attention_layernorm", "self_attention.query_key_value",
                                  "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
             for p in ("weight", "bias")]
    embed = {"word_embeddings.weight": "transformer.word_embeddings.weight"}
    keys = [embed, {f"word_embeddings_layernorm.{p}": f"transformer.word_embeddings_layernorm.{p}"
                    for p in ("weight", "bias")}]
    keys += [{k: f"transformer.h.{i}.{k}" for k in block} for i in range(args.num_layers)]
    ln_f = {f"ln_f.{p}": f"transformer.ln_f.{p}" for p in ("weight", "bias")}
    if args.tie_word_embeddings:
        keys += [ln_f, embed]
    else:
        keys += [{**ln_f, "lm_head.weight": "lm_head.weight"}]
    return keys


def dims(args: Args) -> Dims:
    return Dims(hidden=args.hidden_size, heads=args.num_heads, kv_heads=args.num_heads,
                head_dim=args.hidden_size // args.num_heads, ffn=4 * args.hidden_size, gated=False,
                n_layers=args.num_layers, vocab=args.vocab_size, norm_eps=args.layer_norm_eps, positional="alibi",
                max_positions=None, tied=args.tie_word_embeddings)


def tiny_hf_config(**overrides) -> dict:
    """A tiny random config for tests and the quickstart (6 heads: exercises ALiBi's
    non-power-of-two slopes)."""
    cfg = dict(
        model_type="bloom", architectures=[HF_ARCHITECTURE], vocab_size=320, hidden_size=48, n_layer=4, n_head=6,
        layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return cfg
