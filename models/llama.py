"""Llama family (also Llama-2/3, Mistral-style GQA, rope scaling): pipeline layers + HF key map.

Pipeline layers exchange `(hidden, position_ids)`; the head returns logits.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .blocks import (AttnOptions, BlockBase, GatedMLP, LayerDef, LayerOptions, RMSNorm, Rotary, apply_rotary, attend,
                     rope_parameters)

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
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=rope_parameters(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
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
    def __init__(self, args: Args, attn: AttnOptions):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.attn = args.num_heads, args.num_kv_heads, d, attn
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=args.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=args.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=args.attention_bias)
        self.rotary = Rotary(d, args.rope, args.max_position_embeddings)

    def forward(self, x, position_ids, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(position_ids, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attend(q, k, v, mask, self.attn))


class Block(BlockBase):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(opts)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, opts.attn)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.mlp_bias)

    def block(self, x, position_ids, mask):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class FinalNorm(nn.Module):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, inputs):
        x, position_ids = inputs
        return self.norm(x), position_ids


class Head(FinalNorm):
    """Final norm + lm_head (untied)."""

    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(args, opts)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, inputs):
        x, _ = super().forward(inputs)
        return self.lm_head(x)


def tied_logits(embed: Embed, inputs):
    """Head of a tied model: the embedding matrix projects the (already normed) hidden states."""
    x, _ = inputs
    return x @ embed.embed_tokens.weight.t()


def layers(args: Args) -> list[list[LayerDef]]:
    """Pipeline layers grouped as `parts` counts them: embedding, each block, norm + head."""
    tie = "embed" if args.tie_word_embeddings else None
    head = [LayerDef(FinalNorm), LayerDef(Embed, tie, tied_logits)] if tie else [LayerDef(Head)]
    return [[LayerDef(Embed, tie)]] + [[LayerDef(Block)] for _ in range(args.num_layers)] + [head]


def hf_keys(args: Args) -> list[dict[str, str]]:
    """Per pipeline layer: {our parameter name: HF checkpoint key}."""
    block = [
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    ]
    if args.attention_bias:
        block += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias"]
    if args.mlp_bias:
        block += ["mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"]
    keys = [{"embed_tokens.weight": "model.embed_tokens.weight"}]
    keys += [{k: f"model.layers.{i}.{k}" for k in block} for i in range(args.num_layers)]
    if args.tie_word_embeddings:
        keys += [{"norm.weight": "model.norm.weight"}, {"embed_tokens.weight": "model.embed_tokens.weight"}]
    else:
        keys += [{"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}]
    return keys


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
