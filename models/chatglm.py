"""ChatGLM family (ChatGLM2/3-6B, GLM-4-9B remote-code checkpoints): pipeline layers + HF key map.

Differs from llama in: multi-query attention (`multi_query_group_num` kv groups) through one
fused, biased `query_key_value`; rotary on the first half of each head's dims with adjacent
pairs rotated (base 10000 * rope_ratio); SwiGLU with gate and up fused in `dense_h_to_4h`;
ChatGLM's own config field names (padded_vocab_size, kv_channels, ffn_hidden_size, seq_length).
transformers ships no ChatGLM3: export writes our remote code (hf_remote/chatglm).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import Dims, UnsupportedModel
from .attention import AttnOptions, attend
from .block_base import BlockBase, LayerDef, LayerOptions, decoder_layers
from .loss import head_output
from .norm_mlp import RMSNorm
from .positions import Rotary, apply_rotary_interleaved
from .bloom import Embed  # the same word_embeddings layer

MODEL_TYPES = ("chatglm",)
HF_ARCHITECTURE = "ChatGLMModel"  # what the public config.json says (auto_map picks the class)
TIED_WEIGHTS: list[str] = []
REMOTE_CODE_DIR = str(Path(__file__).resolve().parent / "hf_remote" / "chatglm")

# Fields of ChatGLM-6B v1 / variants whose math we do not implement: (field, required value).
_REQUIRED = (("rmsnorm", True), ("post_layer_norm", True), ("apply_residual_connection_post_layernorm", False),
             ("original_rope", True))


@dataclass
class Args:
    vocab_size: int  # padded_vocab_size
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # multi_query_group_num (num_heads when multi_query_attention is off)
    head_dim: int  # kv_channels
    layernorm_epsilon: float
    rope_theta: float  # 10000 * rope_ratio
    seq_length: int
    add_qkv_bias: bool = True
    add_bias_linear: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Args":
        if "padded_vocab_size" not in hf:
            raise UnsupportedModel("config.json: no padded_vocab_size — ChatGLM-6B v1 is not supported (ChatGLM2/3 are)")
        for field, want in _REQUIRED:
            if hf.get(field, want) != want:
                raise UnsupportedModel(f"config.json: {field}={hf[field]} is not supported (only {want})")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["padded_vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["ffn_hidden_size"],
            num_layers=hf["num_layers"],
            num_heads=heads,
            num_kv_heads=hf["multi_query_group_num"] if hf.get("multi_query_attention") else heads,
            head_dim=hf.get("kv_channels") or hf["hidden_size"] // heads,
            layernorm_epsilon=hf.get("layernorm_epsilon", 1e-5),
            rope_theta=10000.0 * hf.get("rope_ratio", 1),
            seq_length=hf.get("seq_length", 2048),
            add_qkv_bias=hf.get("add_qkv_bias", False),
            add_bias_linear=hf.get("add_bias_linear", False),
        )


class Attention(nn.Module):
    def __init__(self, args: Args, attn: AttnOptions):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.attn = args.num_heads, args.num_kv_heads, d, attn
        self.query_key_value = nn.Linear(h, (self.n_heads + 2 * self.n_kv) * d,  # columns: [q | k | v]
                                         bias=args.add_qkv_bias or args.add_bias_linear)
        self.dense = nn.Linear(self.n_heads * d, h, bias=args.add_bias_linear)
        self.rotary = Rotary(d // 2, {"rope_type": "default", "rope_theta": args.rope_theta}, args.seq_length,
                             interleaved=True)

    def forward(self, x, position_ids, mask, cache=None):
        b, s, _ = x.shape
        d = self.head_dim
        qkv = self.query_key_value(x)
        if cache is not None:  # generation: q and k are adjacent in qkv, rotated as one tensor (half the kernels)
            qk, v = qkv.split([(self.n_heads + self.n_kv) * d, self.n_kv * d], dim=-1)
            qk = qk.view(b, s, self.n_heads + self.n_kv, d).transpose(1, 2)
            cos, sin = self.rotary(position_ids, qk.dtype, cache)
            q, k = apply_rotary_interleaved(qk, cos, sin).split([self.n_heads, self.n_kv], dim=1)
            v = v.view(b, s, self.n_kv, d).transpose(1, 2)  # no copy: nothing is kept for backward
            return self.dense(attend(q, k, v, mask, self.attn, cache=cache))
        q, k, v = qkv.split([self.n_heads * d, self.n_kv * d, self.n_kv * d], dim=-1)
        q = q.view(b, s, self.n_heads, d).transpose(1, 2)
        k = k.view(b, s, self.n_kv, d).transpose(1, 2)
        if torch.is_grad_enabled():  # not a view: see llama.Attention
            v = v.contiguous()
        v = v.view(b, s, self.n_kv, d).transpose(1, 2)
        cos, sin = self.rotary(position_ids, q.dtype)
        q, k = apply_rotary_interleaved(q, cos, sin), apply_rotary_interleaved(k, cos, sin)
        return self.dense(attend(q, k, v, mask, self.attn, cache=cache))


class MLP(nn.Module):
    """SwiGLU with gate and up stacked in one projection: dense_h_to_4h rows = [gate; up]."""

    def __init__(self, args: Args):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, 2 * args.ffn_hidden_size, bias=args.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(args.ffn_hidden_size, args.hidden_size, bias=args.add_bias_linear)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class Block(BlockBase):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(opts)
        self.input_layernorm = RMSNorm(args.hidden_size, args.layernorm_epsilon)
        self.self_attention = Attention(args, opts.attn)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.layernorm_epsilon)
        self.mlp = MLP(args)

    def block(self, x, position_ids, mask, cache=None):
        x = x + self.self_attention(self.input_layernorm(x), position_ids, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Head(nn.Module):
    """Final norm + output_layer (untied)."""

    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__()
        self.final_layernorm = RMSNorm(args.hidden_size, args.layernorm_epsilon)
        self.output_layer = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, inputs):
        x, _ = inputs
        x = self.final_layernorm(x)
        chunked = head_output(self, x, self.output_layer.weight)  # head_chunk_tokens: the loss projects per chunk
        return chunked if chunked is not None else self.output_layer(x)


def layers(args: Args) -> list[list[LayerDef]]:
    return decoder_layers(args.num_layers, Embed, Block, None, Head)  # the head holds the final norm


def hf_keys(args: Args) -> list[dict[str, str]]:
    """Per pipeline layer: {our parameter name: HF checkpoint key} (public names, a prefix swap).
    `transformer.rotary_pos_emb.inv_freq` in public checkpoints is a buffer: not read."""
    block = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attention.query_key_value.weight",
             "self_attention.dense.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"]
    if args.add_qkv_bias or args.add_bias_linear:
        block.append("self_attention.query_key_value.bias")
    if args.add_bias_linear:
        block += ["self_attention.dense.bias", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.bias"]
    return ([{"word_embeddings.weight": "transformer.embedding.word_embeddings.weight"}]
            + [{k: f"transformer.encoder.layers.{i}.{k}" for k in block} for i in range(args.num_layers)]
            + [{"final_layernorm.weight": "transformer.encoder.final_layernorm.weight",
                "output_layer.weight": "transformer.output_layer.weight"}])


def export_hf_config(hf: dict) -> dict:
    """config.json of an export: auto_map to our remote code (keeps a tokenizer entry)."""
    out = dict(hf)
    tokenizer = (hf.get("auto_map") or {}).get("AutoTokenizer")
    out["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                       "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                       "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                       "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                       **({"AutoTokenizer": tokenizer} if tokenizer else {})}
    return out


def dims(args: Args) -> Dims:
    return Dims(hidden=args.hidden_size, heads=args.num_heads, kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                ffn=args.ffn_hidden_size, gated=True, n_layers=args.num_layers, vocab=args.vocab_size,
                norm_eps=args.layernorm_epsilon, positional="rope", max_positions=args.seq_length,
                tied=False)


def tiny_hf_config(**overrides) -> dict:
    """A tiny random ChatGLM3-shaped config: 4 heads in 2 kv groups, qkv bias, rope_ratio 2."""
    cfg = dict(
        model_type="chatglm", architectures=[HF_ARCHITECTURE], padded_vocab_size=320, hidden_size=64,
        ffn_hidden_size=96, kv_channels=16, num_layers=4, num_attention_heads=4, multi_query_attention=True,
        multi_query_group_num=2, add_qkv_bias=True, add_bias_linear=False, layernorm_epsilon=1e-5, rmsnorm=True,
        post_layer_norm=True, apply_residual_connection_post_layernorm=False, original_rope=True, rope_ratio=2,
        seq_length=256, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
    )
    cfg.update(overrides)
    return cfg
