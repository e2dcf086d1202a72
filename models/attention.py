"""The attention core and how its backend is chosen: SDPA, FlexAttention, flash-attn or eager.

The masks it reads are built outside the (compiled) blocks by models/masks.py; generation's
caches (models/kv_cache.py) come in through `attend(cache=)`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttnOptions:
    """How attention runs; chosen once from the training config, the same for every block."""

    packed: bool = False  # rows hold several documents: mask attention across them
    impl: str = "sdpa"  # sdpa | flex (document-masked kernel, GPU) | flash (flash-attn) | eager (reference)
    # the seq axis (models/sequence_parallel.SeqGroup): each rank holds a slice of every row's tokens;
    # attend all-to-alls around the call, masks are built from the whole row's positions
    seq: object = None


def attn_impl(packed: bool, use_flash_attn: bool, on_gpu: bool) -> str:
    """The fastest attention available: on GPU FlexAttention for packed rows (skips cross-document
    blocks; flash-attn's causal kernel cannot take the document mask, which would leave SDPA with a
    dense one), flash-attn for plain causal rows when asked for and importable, else SDPA's
    flash/cuDNN kernels; SDPA with a boolean mask on CPU."""
    if use_flash_attn and on_gpu and not packed:
        try:
            import flash_attn  # noqa: F401
            return "flash"
        except ImportError:
            pass
    return "flex" if (on_gpu and packed) else "sdpa"


FLEX_MIN_HEAD_DIM = 16  # FlexAttention's GPU kernels: "NYI: embedding dimension of the query, key, and value must be at least 16"


def options_for_head_dim(opts: "LayerOptions", head_dim: int) -> "LayerOptions":
    """`opts` for a model of this head dim: one FlexAttention cannot run (head dim < 16, e.g. the
    tiny bloom's 8) takes SDPA with the dense document mask instead; attention_mask then builds
    the mask form SDPA reads (both follow `opts.attn.impl`). Applied once per model, by
    models.pipeline (build_pipeline, SequentialModel)."""
    if opts.attn.impl == "flex" and head_dim < FLEX_MIN_HEAD_DIM:
        return dataclasses.replace(opts, attn=dataclasses.replace(opts.attn, impl="sdpa"))
    return opts



def _flex():
    """flex_attention must run compiled on GPU to be fast; inside an already compiled block it is
    traced as part of that graph, outside one we compile it once."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return flex_attention
    return _compiled_flex()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# FlexAttention's backward runs dK/dV as one program per (KV block, batch, KV head), each looping over
# its group's query heads: with few KV heads (chatglm3: 2 for 32) too few programs fill the GPU. Measured
# on an H100 (bench/gqa_flex_bench.py, micro 4 x 2048, fwd + bwd): group 16 (chatglm3) 2.04 ms with
# enable_gqa vs 1.81 ms with K/V expanded first; group 4 (mixtral) 1.72 vs 1.83. Groups of at least
# this size are expanded (8 lies between the two measured points).
FLEX_EXPAND_GROUP = 8


def attend(q, k, v, mask, opts: AttnOptions, bias: torch.Tensor | None = None,
           scale: float | None = None, cache: "KVCache | StaticKVCache | None" = None) -> torch.Tensor:
    """Causal attention. q: [B, H, S, D]; k, v: [B, Hkv, S, D] (grouped-query when Hkv < H).

    mask: from `attention_mask` (None = plain causal); bias: additive float, broadcastable to
    [B, H, S, S] (ALiBi; runs through SDPA with a dense mask). Returns [B, S, H*D].
    cache (generation only; training never passes one): k, v and the key bias of these S new
    tokens join the earlier ones; `mask` is then KVCache.mask's ([B, 1, S, T] or None = all keys).
    """
    if opts.seq is not None and cache is None:  # my heads over the whole row, then back to my tokens
        from .sequence_parallel import attend as seq_attend

        return seq_attend(q, k, v, mask, opts, bias, scale, opts.seq, local_attend)
    return local_attend(q, k, v, mask, opts, bias, scale, cache)


def local_attend(q, k, v, mask, opts: AttnOptions, bias: torch.Tensor | None = None,
                 scale: float | None = None, cache: "KVCache | StaticKVCache | None" = None) -> torch.Tensor:
    """`attend` over the heads and tokens given (opts.seq not read: sequence_parallel calls it on
    the whole row)."""
    b, h, s, d = q.shape
    if cache is not None:
        k, v, bias = cache.update(k, v, bias)
    gqa = k.shape[1] != h
    if opts.impl == "flex" and mask is not None and cache is None:
        if gqa and h // k.shape[1] >= FLEX_EXPAND_GROUP:
            k, v = k.repeat_interleave(h // k.shape[1], dim=1), v.repeat_interleave(h // k.shape[1], dim=1)
            gqa = False
        score_mod = None
        if bias is not None:  # ALiBi as a score modifier: flex still skips cross-document tiles
            full = bias.to(q.dtype).expand(b, h, 1, s)

            def score_mod(score, bi, hi, qi, ki):
                return score + full[bi, hi, 0, ki]
        out = _flex()(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, s, h * d)
    if opts.impl == "flash" and bias is None and mask is None and cache is None:
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=scale)
        return out.reshape(b, s, h * d)
    if bias is not None or opts.impl == "eager":
        if gqa:
            rep = h // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
    if bias is not None:
        if mask is None and cache is not None:  # one new query: every key is visible
            mask = bias.to(q.dtype)
        else:
            causal = mask if mask is not None else torch.ones(s, s, dtype=torch.bool, device=q.device).tril()[None, None]
            mask = bias.to(q.dtype).masked_fill(~causal, float("-inf"))
    is_causal = mask is None and cache is None
    if opts.impl == "eager":
        scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else d ** -0.5)
        if is_causal:
            scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        elif mask is None:
            pass  # generation: one query, every cached key
        elif mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(b, s, h * d)
