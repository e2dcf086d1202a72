"""Baichuan family (Baichuan2-7B/13B, also Baichuan-7B/13B v1): pipeline layers + HF key map.

Differs from llama in three places only: q/k/v are one fused `W_pack` projection; the 13B
sizes use ALiBi instead of rotary; Baichuan2's lm_head is a NormHead (rows L2-normalised at
every forward). transformers ships no Baichuan: export writes our remote code (hf_remote/baichuan).
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import Dims, UnsupportedModel
from .attention import AttnOptions, attend
from .block_base import BlockBase, LayerDef, LayerOptions, decoder_layers
from .loss import head_output
from .norm_mlp import GatedMLP, RMSNorm, gated_mlp_keys
from .positions import Rotary, alibi_bias, alibi_slopes, apply_rotary
from .keymap import with_prefix
from .llama import Embed, FinalNorm

MODEL_TYPES = ("baichuan",)
HF_ARCHITECTURE = "BaichuanForCausalLM"
TIED_WEIGHTS: list[str] = []  # baichuan never ties embedding and head
REMOTE_CODE_DIR = str(Path(__file__).resolve().parent / "hf_remote" / "baichuan")
V1_VOCAB_SIZE = 64000  # Baichuan v1 (plain lm_head); Baichuan2 has 125696 and a NormHead


V1_7B_ARCHITECTURE = "BaiChuanForCausalLM"  # Baichuan-7B v1's class name (capital C): always rotary


def position_embedding_of(hf: dict) -> str:
    """"rope" or "alibi". Our exports write it as `position_embedding` (vLLM-style configs as
    "ROPE"/"ALIBI"); Baichuan-7B v1 names its class BaiChuanForCausalLM. Public Baichuan2 and
    Baichuan-13B configs do not say (one modeling file per size: 7B rotary, 13B ALiBi), so the
    kind is guessed from hidden_size == 4096 as serving stacks do, with a one-line warning."""
    kind = hf.get("position_embedding")
    if kind is None and V1_7B_ARCHITECTURE in (hf.get("architectures") or []):
        kind = "rope"
    if kind is None:
        kind = "rope" if hf["hidden_size"] == 4096 else "alibi"
        _warn_once(f"warning: config.json: no position_embedding; guessed {kind!r} from hidden_size="
                   f"{hf['hidden_size']} (4096: Baichuan2-7B rotary, else 13B ALiBi); set it to override")
    if str(kind).lower() not in ("rope", "alibi"):
        raise UnsupportedModel(f"config.json: position_embedding {kind!r} is not 'rope' or 'alibi'")
    return str(kind).lower()


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    position_embedding: str  # "rope" (7B) | "alibi" (13B)
    norm_head: bool  # lm_head rows L2-normalised at forward (Baichuan2)
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Args":
        if hf.get("tie_word_embeddings"):
            raise UnsupportedModel("config.json: tie_word_embeddings=true is not a Baichuan model")
        if hf.get("z_loss_weight"):
            raise UnsupportedModel(f"config.json: z_loss_weight={hf['z_loss_weight']} is not supported (public Baichuan2 "
                             "configs use 0); set it to 0")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            position_embedding=position_embedding_of(hf),
            norm_head=hf.get("norm_head", hf["vocab_size"] != V1_VOCAB_SIZE),
            rope_theta=hf.get("rope_theta", 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings") or hf.get("model_max_length") or 4096,
        )


class Attention(nn.Module):
    def __init__(self, args: Args, attn: AttnOptions):
        super().__init__()
        h = args.hidden_size
        self.n_heads, self.head_dim, self.attn = args.num_heads, h // args.num_heads, attn
        self.W_pack = nn.Linear(h, 3 * h, bias=False)  # rows: [q; k; v]
        self.o_proj = nn.Linear(h, h, bias=False)
        self.alibi = args.position_embedding == "alibi"
        if self.alibi:
            self.slopes = alibi_slopes(self.n_heads)  # fp32 on CPU, not a buffer (as bloom's)
        else:
            self.rotary = Rotary(self.head_dim, {"rope_type": "default", "rope_theta": args.rope_theta},
                                 args.max_position_embeddings)

    def forward(self, x, position_ids, mask, cache=None):
        b, s, _ = x.shape
        qkv = self.W_pack(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        bias = None
        if self.alibi:
            bias = alibi_bias(self.slopes, position_ids, cache)
        elif cache is not None:  # generation: q and k rotated as one tensor (half the kernels); v stays a view
            q, k = apply_rotary(qkv[:2], *self.rotary(position_ids, q.dtype, cache))
        else:
            cos, sin = self.rotary(position_ids, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if torch.is_grad_enabled():  # q, k are new now; a view v would keep all of W_pack's output (llama.Attention)
                v = v.contiguous()
        return self.o_proj(attend(q, k, v, mask, self.attn, bias, cache=cache))


class Block(BlockBase):
    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(opts)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, opts.attn)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size)

    def block(self, x, position_ids, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class NormHead(nn.Module):
    """Baichuan2's lm_head: logits = x @ normalize(W, rows).T, in training and inference alike
    (the public code normalises W in place at the first eval forward; same result)."""

    def __init__(self, hidden: int, vocab: int, normalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))
        nn.init.normal_(self.weight, std=0.02)
        self.normalize = normalize

    def forward(self, x):
        return F.linear(x, self.projection())

    def projection(self) -> torch.Tensor:
        """The [vocab, hidden] matrix the logits are taken with (rows normalised for Baichuan2)."""
        return F.normalize(self.weight, dim=-1) if self.normalize else self.weight


class Head(FinalNorm):
    """Final norm + NormHead."""

    def __init__(self, args: Args, opts: LayerOptions):
        super().__init__(args, opts)
        self.lm_head = NormHead(args.hidden_size, args.vocab_size, args.norm_head)

    def forward(self, inputs):
        x, _ = super().forward(inputs)
        if getattr(self, "chunked_loss", None) is not None:  # head_chunk_tokens: normalised once, then chunks
            return head_output(self, x, self.lm_head.projection())
        return self.lm_head(x)


def layers(args: Args) -> list[list[LayerDef]]:
    return decoder_layers(args.num_layers, Embed, Block, FinalNorm, Head)


def hf_keys(args: Args) -> list[dict]:
    """Per pipeline layer: {our parameter name: HF checkpoint key or Fused} (public names, a
    prefix swap; gate/up are one fused projection, models/keymap.py)."""
    block = {k: k for k in ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.W_pack.weight",
                            "self_attn.o_proj.weight"]}
    block.update(gated_mlp_keys(args.intermediate_size, bias=False))
    return ([{"embed_tokens.weight": "model.embed_tokens.weight"}]
            + [with_prefix(block, f"model.layers.{i}.") for i in range(args.num_layers)]
            + [{"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}])


def export_hf_config(hf: dict) -> dict:
    """config.json of an export: our remote code, with the size-implied choices written out."""
    out = dict(hf)
    args = Args.from_hf_config(hf)
    out.update(position_embedding=args.position_embedding, norm_head=args.norm_head, model_type="baichuan")
    tokenizer = (hf.get("auto_map") or {}).get("AutoTokenizer")
    out["auto_map"] = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                       "AutoModel": "modeling_baichuan.BaichuanModel",
                       "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
                       **({"AutoTokenizer": tokenizer} if tokenizer else {})}
    return out


def dims(args: Args) -> Dims:
    return Dims(hidden=args.hidden_size, heads=args.num_heads, kv_heads=args.num_heads,
                head_dim=args.hidden_size // args.num_heads, ffn=args.intermediate_size, gated=True,
                n_layers=args.num_layers, vocab=args.vocab_size, norm_eps=args.rms_norm_eps,
                positional=args.position_embedding, max_positions=args.max_position_embeddings, tied=False)


def tiny_hf_config(**overrides) -> dict:
    """A tiny random Baichuan2-7B-shaped config (rotary); pass position_embedding="alibi" for 13B's."""
    cfg = dict(
        model_type="baichuan", architectures=[HF_ARCHITECTURE], vocab_size=320, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256,
        model_max_length=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, z_loss_weight=0, position_embedding="rope",
    )
    cfg.update(overrides)
    return cfg
