"""Math shared by every model family: norms, rotary embeddings, the attention core, gated MLP.

Families compose these; anything written twice across families belongs here. All layers keep
HF-style parameter names so that a family's checkpoint key map is a prefix swap.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as llama/baichuan/chatglm/mixtral do."""

    liger = False  # kernels: liger (models.pipeline.liger_blocks): liger's Triton RMSNorm, llama casting

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.liger:  # same numerics (fp32 rstd, cast back, times weight); in_place=False: dY is not reused
            from liger_kernel.ops import LigerRMSNormFunction
            return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- rotary
def rope_parameters(hf: dict) -> dict:
    """The rope settings of an HF config dict, old (`rope_theta` + `rope_scaling`) or new
    (`rope_parameters`) style, as one dict with at least `rope_type` and `rope_theta`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def rope_inv_freq(dim: int, params: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the cos/sin scale, per rope type.

    Supports default, linear, dynamic (these are its frequencies up to `max_position_embeddings`;
    Rotary recomputes them for longer documents), llama3 and yarn; anything else is an error
    rather than a silent default.
    """
    base = float(params["rope_theta"])
    kind = params["rope_type"]
    if kind == "dynamic":
        return dynamic_ntk_inv_freq(dim, base, float(params["factor"]), max_position_embeddings,
                                    max_position_embeddings), 1.0
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(params["factor"]), 1.0
    if kind == "llama3":
        factor, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor = float(params["factor"])
        old = float(params.get("original_max_position_embeddings") or max_position_embeddings)
        mscale = params.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

        def correction_dim(rot):
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

        low = math.floor(correction_dim(beta_fast))
        high = math.ceil(correction_dim(beta_slow))
        low, high = max(low, 0), min(high, dim - 1)
        ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
        extrapolation = 1 - ramp.clamp(0, 1)
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        return inv, float(mscale)
    raise ValueError(f"rope_type {kind!r} is not supported (default, linear, dynamic, llama3, yarn)")


def dynamic_ntk_inv_freq(dim: int, base: float, factor: float, max_pos: int, seq_len) -> torch.Tensor:
    """transformers' dynamic NTK rope: past `max_pos` the base grows with the sequence length.
    `seq_len` an int (at init) or an int64 tensor of per-token lengths -> [..., dim/2], the same
    float32 arithmetic as transformers' _compute_dynamic_ntk_parameters."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if isinstance(seq_len, torch.Tensor):
        seq_len, exponent = seq_len.clamp(min=max_pos)[..., None], exponent.to(seq_len.device)
    else:
        seq_len = max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** exponent)


def document_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the length of its document (positions restart at 0 per packed document)."""
    doc = document_ids(position_ids).long()
    last = torch.zeros(doc.shape[0], doc.shape[1] + 1, dtype=position_ids.dtype, device=position_ids.device)
    return last.scatter_reduce(1, doc, position_ids, "amax").gather(1, doc) + 1


class Rotary(nn.Module):
    """cos/sin tables from position ids (positions restart per packed document).

    rope_type dynamic: each document longer than `max_position_embeddings` gets the frequencies
    transformers computes for that document alone (its sequence length); shorter ones keep the
    original ones. (transformers also keeps a longer length's frequencies for later calls until
    one is short again: a generation-cache artifact not reproduced here.)"""

    def __init__(self, dim: int, params: dict, max_position_embeddings: int, interleaved: bool = False):
        super().__init__()
        inv, self.scale = rope_inv_freq(dim, params, max_position_embeddings)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved  # tables for apply_rotary_interleaved: [.., dim/2], one entry per pair
        self.dynamic = None
        if params["rope_type"] == "dynamic":
            self.dynamic = (dim, float(params["rope_theta"]), float(params["factor"]), max_position_embeddings)
        # what makes two Rotary tables equal (every layer of a model has the same): their key in
        # generation's per-step memo, where all layers share one set of tables
        # (from the arguments, not inv_freq's values: layers are also built on the meta device)
        self.spec = ("rotary", dim, repr(sorted(params.items())), max_position_embeddings, interleaved)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                cache: "KVCache | StaticKVCache | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, D] (D/2 interleaved). With a generation cache: [B, 1, S, D], broadcast
        over heads, computed once per decode step for all layers (the cache's step memo, which
        OurLM clears before each step) instead of once per layer."""
        if cache is None or cache.step is None:  # training, compiled blocks: as always, no shared state
            return self.tables(position_ids, dtype)
        return per_step(cache, (self.spec, self.inv_freq.dtype, dtype, position_ids.device),
                        lambda: tuple(t[:, None] for t in self.tables(position_ids, dtype)))

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq.float().to(position_ids.device)
        if self.dynamic is not None:  # no host sync: the scaled frequencies are computed for every token
            lengths = document_lengths(position_ids)
            inv = torch.where((lengths > self.dynamic[-1])[..., None],
                              dynamic_ntk_inv_freq(*self.dynamic, lengths), inv)
        freqs = position_ids[..., None].float() * inv
        emb = freqs if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:  # a Python float: the same branch in every trace
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def per_step(cache, key, compute):
    """compute() once per generation step for all layers: kept in the caches' shared step memo
    (`cache.step`, which OurLM clears before each step, so a captured decode step computes it
    inside the capture); without one (training, a cache of its own), every call."""
    if cache is None or cache.step is None:
        return compute()
    if key not in cache.step:
        cache.step[key] = compute()
    return cache.step[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [B, S, D] (llama's half-split layout), or [B, 1, S, D]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0,x1),(x2,x3)... of the first 2*R dims, pass the rest (chatglm's
    partial rotary, GPT-J layout). x: [B, H, S, D]; cos/sin: [B, S, R] (or [B, 1, S, R]) from
    Rotary(interleaved=True)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    r = 2 * cos.shape[-1]
    x0, x1 = x[..., 0:r:2], x[..., 1:r:2]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., r:]), dim=-1)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.; bloom and baichuan-13B): geometric for a power of two
    heads, else the power-of-two set plus every other slope of the next power of two."""
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_2(closest)
    if closest != n_heads:
        slopes += power_of_2(2 * closest)[0::2][:n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")  # constants: never meta, never bf16


def alibi_bias(slopes: torch.Tensor, position_ids: torch.Tensor, cache: "KVCache | None" = None) -> torch.Tensor:
    """Additive ALiBi bias [B, H, 1, S]: slope * key position. Softmax is shift-invariant per query
    row, so this equals -slope * (query - key) on every causal (and same-document) pair.
    cache (generation): computed once per step for all layers, as Rotary's tables; `slopes` are
    alibi_slopes(H), so H and the device name them."""
    return per_step(cache, ("alibi", slopes.shape[0], position_ids.device),
                    lambda: _slopes_on(slopes, position_ids.device)[None, :, None, None]
                    * position_ids[:, None, None, :].float())


def _slopes_on(slopes: torch.Tensor, device) -> torch.Tensor:
    """The (CPU) slopes on `device`, copied once per device: a host-to-device copy inside a captured
    CUDA graph (generation's decode step) would record a pointer to host memory freed afterwards."""
    if slopes.device == torch.device(device) or torch.compiler.is_compiling():
        return slopes.to(device)  # a compiled block (training) traces the copy as a constant
    return _device_slopes(tuple(slopes.tolist()), torch.device(device))  # tolist: a CPU tensor, no GPU sync


@functools.lru_cache(maxsize=None)
def _device_slopes(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)  # float32 -> float -> float32 is exact


# ----------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class AttnOptions:
    """How attention runs; chosen once from the training config, the same for every block."""

    packed: bool = False  # rows hold several documents: mask attention across them
    impl: str = "sdpa"  # sdpa | flex (document-masked kernel, GPU) | flash (flash-attn) | eager (reference)


def attn_impl(packed: bool, use_flash_attn: bool, on_gpu: bool) -> str:
    """The fastest attention available: flash-attn when asked for and importable, else on GPU
    FlexAttention for packed rows (skips cross-document blocks) and SDPA's flash/cuDNN kernels
    for plain causal rows; SDPA with a boolean mask on CPU."""
    if use_flash_attn and on_gpu:
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
    import dataclasses

    if opts.attn.impl == "flex" and head_dim < FLEX_MIN_HEAD_DIM:
        return dataclasses.replace(opts, attn=dataclasses.replace(opts.attn, impl="sdpa"))
    return opts


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed rows restart position ids at 0 for each document: number the documents."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


class _LastMask:
    """The mask of the last position_ids tensor seen. Every block of a pipeline stage gets the
    same position_ids object for a micro-batch, so the mask is built once per stage and step."""

    def __init__(self):
        self.ref, self.key, self.mask = None, None, None

    def get(self, position_ids, key, build):
        if self.ref is not None and self.ref() is position_ids and self.key == key:
            return self.mask
        self.mask = build()
        self.ref, self.key = weakref.ref(position_ids), key
        return self.mask


_last_mask = _LastMask()


def attention_mask(position_ids: torch.Tensor, opts: AttnOptions, window: int | None = None):
    """The causal (+ per-document, + sliding-window) mask in the form `opts.impl` wants: None for
    plain causal, a boolean [B, 1, S, S] tensor (True = may attend) for SDPA/eager, a BlockMask for
    flex. Built outside compiled code and shared by all blocks of a stage."""
    if not opts.packed and window is None:
        return None
    return _last_mask.get(position_ids, (opts, window), lambda: _build_mask(position_ids, opts, window))


def _build_mask(position_ids, opts: AttnOptions, window):
    b, s = position_ids.shape
    doc = document_ids(position_ids) if opts.packed else None
    if opts.impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(bi, hi, qi, ki):
            keep = qi >= ki
            if doc is not None:
                keep = keep & (doc[bi, qi] == doc[bi, ki])
            if window is not None:
                keep = keep & (qi - ki < window)
            return keep

        return create_block_mask(mask_mod, b, None, s, s, device=position_ids.device)
    i = torch.arange(s, device=position_ids.device)
    mask = (i[:, None] >= i[None, :])[None]
    if window is not None:
        mask = mask & ((i[:, None] - i[None, :]) < window)[None]
    if doc is not None:
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    return mask[:, None]


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


def attend(q, k, v, mask, opts: AttnOptions, bias: torch.Tensor | None = None,
           scale: float | None = None, cache: "KVCache | None" = None) -> torch.Tensor:
    """Causal attention. q: [B, H, S, D]; k, v: [B, Hkv, S, D] (grouped-query when Hkv < H).

    mask: from `attention_mask` (None = plain causal); bias: additive float, broadcastable to
    [B, H, S, S] (ALiBi; runs through SDPA with a dense mask). Returns [B, S, H*D].
    cache (generation only; training never passes one): k, v and the key bias of these S new
    tokens join the earlier ones; `mask` is then KVCache.mask's ([B, 1, S, T] or None = all keys).
    """
    b, h, s, d = q.shape
    if cache is not None:
        k, v, bias = cache.update(k, v, bias)
    gqa = k.shape[1] != h
    if opts.impl == "flex" and mask is not None and cache is None:
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


class KVCache:
    """One attention layer's keys, values (and key bias, ALiBi) of the tokens generated so far.

    Stored in buffers that grow by doubling, so a step appends in place instead of copying the
    whole history (torch.cat would); `update` returns views of everything up to now. The cache
    stays on the device of the layer that fills it, so layers split over devices keep theirs.
    """

    def __init__(self, step: dict | None = None):
        self.length = 0
        self.k = self.v = self.bias = None
        self.step = step  # per-step memo shared by a model's caches (rotary tables), cleared before each step

    def mask(self, s: int, window: int | None, device) -> torch.Tensor | None:
        """Mask of S new queries over all T = length + S keys: causal at the offset, and within the
        sliding window; None when a single query may see every key."""
        return _offset_mask(self.length, s, window, device)

    @staticmethod
    def _append(buf, new, at: int, dim: int):
        need = at + new.shape[dim]
        if buf is None or buf.shape[dim] < need:
            shape = list(new.shape)
            shape[dim] = max(2 * need, 64)
            grown = new.new_empty(shape)
            if buf is not None:
                grown.narrow(dim, 0, at).copy_(buf.narrow(dim, 0, at))
            buf = grown
        buf.narrow(dim, at, new.shape[dim]).copy_(new)
        return buf, buf.narrow(dim, 0, need)

    def update(self, k, v, bias=None):
        at = self.length
        self.k, k = self._append(self.k, k, at, 2)
        self.v, v = self._append(self.v, v, at, 2)
        if bias is not None:  # [B, H, 1, S]: one value per key
            self.bias, bias = self._append(self.bias, bias, at, 3)
        self.length = k.shape[2]  # k is now every key so far
        return k, v, bias


def _offset_mask(length: int, s: int, window: int | None, device) -> torch.Tensor | None:
    """[1, 1, S, length + S] bool: S new queries after `length` cached keys, causal at the offset
    and within the sliding window; None when a single query may see every key."""
    t = length + s
    if s == 1 and (window is None or t <= window):
        return None
    q = torch.arange(length, t, device=device)[:, None]
    keys = torch.arange(t, device=device)[None]
    keep = keys <= q
    if window is not None:
        keep = keep & (q - keys < window)
    return keep[None, None]


class DecodeCursor:
    """Where a generation stands, shared by all StaticKVCaches of one model.

    `length`: tokens already cached (host int, what prefill and buffer sizing read). In a decode
    step (`decoding`) the position lives on each device as a [1, 1] int64 tensor (`pos(device)`,
    also the step's position_ids), set with fill_ before the step runs or a captured graph of it
    replays, so the step itself has static shapes and never reads a value back to the host.
    """

    def __init__(self, capacity: int):
        self.capacity, self.length, self.decoding = capacity, 0, False
        self._pos: dict[torch.device, torch.Tensor] = {}
        self._keys: dict[torch.device, torch.Tensor] = {}

    def pos(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._pos:
            self._pos[device] = torch.full((1, 1), self.length, dtype=torch.long, device=device)
        return self._pos[device]

    def set_position(self, length: int) -> None:
        """Before a decode step: the new token goes to position `length` (one small kernel per device)."""
        self.length = length
        for t in self._pos.values():
            t.fill_(length)

    def decode_mask(self, window: int | None, device) -> torch.Tensor:
        """[1, 1, 1, capacity] bool: keys at or before the position (and within the window), built
        on the device from the position tensor (StaticKVCache.mask: once per step, device and window)."""
        device = torch.device(device)
        if self._keys.get(device) is None or self._keys[device].numel() != self.capacity:
            self._keys[device] = torch.arange(self.capacity, device=device)
        keys, pos = self._keys[device], self.pos(device).view(1)
        keep = keys <= pos
        if window is not None:
            keep = keep & (pos - keys < window)
        return keep[None, None, None]


class StaticKVCache:
    """A KVCache whose buffers hold the whole generation (`cursor.capacity` positions), allocated
    once: a decode step writes its key/value at the device position (index_copy_) and attends over
    every slot, those past the position masked out, so its shapes never change and it can be
    captured as a CUDA graph. Prefill (S > 1 tokens) writes at the host offset and attends over
    the filled prefix, as KVCache does. Buffers start zeroed: a masked slot gets probability 0,
    and 0 * garbage could be NaN."""

    def __init__(self, cursor: DecodeCursor, step: dict | None = None):
        self.cursor = cursor
        self.k = self.v = self.bias = None
        # as KVCache's; cleared at the start of each step, so a captured decode step computes what
        # it memoizes inside the capture (from the position tensor it replays with)
        self.step = step

    def mask(self, s: int, window: int | None, device) -> torch.Tensor | None:
        if self.cursor.decoding:
            return per_step(self, ("decode_mask", window, torch.device(device)),
                            lambda: self.cursor.decode_mask(window, device))
        return _offset_mask(self.cursor.length, s, window, device)

    def _buffer(self, buf, new, dim: int):
        """`buf` sized to the capacity (a larger capacity copies the filled prefix over)."""
        if buf is not None and buf.shape[dim] == self.cursor.capacity:
            return buf
        shape = list(new.shape)
        shape[dim] = self.cursor.capacity
        grown = new.new_zeros(shape)
        if buf is not None:
            n = min(self.cursor.length, buf.shape[dim], self.cursor.capacity)
            grown.narrow(dim, 0, n).copy_(buf.narrow(dim, 0, n))
        return grown

    def _write(self, buf, new, dim: int):
        buf = self._buffer(buf, new, dim)
        if self.cursor.decoding:  # whole buffer; the mask hides the slots past the position
            return buf, buf.index_copy_(dim, self.cursor.pos(buf.device).view(1), new)
        at = self.cursor.length
        buf.narrow(dim, at, new.shape[dim]).copy_(new)
        return buf, buf.narrow(dim, 0, at + new.shape[dim])

    def update(self, k, v, bias=None):
        self.k, k = self._write(self.k, k, 2)
        self.v, v = self._write(self.v, v, 2)
        if bias is not None:  # [B, H, 1, S]: one value per key
            self.bias, bias = self._write(self.bias, bias, 3)
        return k, v, bias


# ----------------------------------------------------------------------------- fused projections
def fused_linear(in_features: int, sizes: tuple[int, ...], bias: bool = False) -> nn.Linear:
    """Several projections of one input as one matmul (q/k/v, gate/up): one large GEMM instead
    of two or three smaller ones, and one weight-gradient GEMM in backward. Rows are the parts
    stacked in order; the caller splits the output (`.split(sizes, -1)`). A plain nn.Linear, so
    module swaps (torchao float8) apply to it. The HF checkpoint split is undone at conversion
    time (models/keymap.py), not per step."""
    return nn.Linear(in_features, sum(sizes), bias=bias)


def accept_unfused(module: nn.Module, fused: str, parts: tuple[str, ...]) -> None:
    """Let `module` load a state dict written when its fused linear `fused` was the separate
    linears `parts` (pipeline checkpoints from before the fusion, DeepSpeed resume included)."""
    accept_old_layout(module, {f"{fused}.{kind}": tuple(f"{p}.{kind}" for p in parts) for kind in ("weight", "bias")})


def accept_old_layout(module: nn.Module, mapping: dict) -> None:
    """Let `module` load a state dict in a layout from before a fusion: mapping = {parameter:
    (old names, concatenated along dim 0)} or {parameter: keymap.Fused} (its `old` names, relative
    to `module`, joined as Fused.join: stacked experts)."""
    module.unfused_parts = mapping  # read by keymap.unfused_names (optimizer state of old checkpoints)
    module.register_load_state_dict_pre_hook(functools.partial(_fuse_on_load, mapping))


def _fuse_on_load(mapping, module, state_dict, prefix, *_):
    from .keymap import fuse_old_layout

    fuse_old_layout(state_dict, mapping, prefix)


# ----------------------------------------------------------------------------- MLP
class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); gate and up are one fused projection (rows [gate; up])."""

    liger = False  # kernels: liger: liger's SwiGLU kernel reads the fused [gate | up] output as it is

    def __init__(self, hidden: int, ffn: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = fused_linear(hidden, (ffn, ffn), bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)
        accept_unfused(self, "gate_up_proj", ("gate_proj", "up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.liger:
            from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction
            return self.down_proj(LigerFusedGateUpSiLUMulFunction.apply(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def gated_mlp_keys(ffn: int, bias: bool, prefix: str = "mlp.") -> dict:
    """hf_keys entries of a GatedMLP whose HF checkpoint has separate gate_proj / up_proj."""
    from .keymap import Fused

    keys = {}
    for kind in ("weight", "bias") if bias else ("weight",):
        old = (f"{prefix}gate_proj.{kind}", f"{prefix}up_proj.{kind}")
        keys[f"{prefix}gate_up_proj.{kind}"] = Fused(old, (ffn, ffn), old)
        keys[f"{prefix}down_proj.{kind}"] = f"{prefix}down_proj.{kind}"
    return keys


# ----------------------------------------------------------------------------- layer plumbing
@dataclass(frozen=True)
class LayerDef:
    """One pipeline layer of a family: built as `cls(args, opts)`.

    Layers with the same `tie` key share one module (tied embeddings); a twin that is not the
    first runs `forward_fn(module, inputs)` instead of the module's own forward.
    """

    cls: type
    tie: str | None = None
    forward_fn: Callable | None = None


def decoder_layers(n_blocks: int, embed: type, block: type, final_norm: type | None, head: type,
                   tied_logits: Callable | None = None, embed_extra: tuple[type, ...] = ()) -> list[list[LayerDef]]:
    """A decoder's pipeline layers grouped as `parts` counts them: the embedding (+ `embed_extra`
    layers in its slot), each block, and the final norm + head. With `tied_logits` the head is
    the final norm followed by the embedding's twin, which projects through `tied_logits(embed,
    inputs)` with the embedding's own weight."""
    tie = "embed" if tied_logits else None
    last = [LayerDef(final_norm), LayerDef(embed, tie, tied_logits)] if tie else [LayerDef(head)]
    first = [LayerDef(embed, tie), *map(LayerDef, embed_extra)]
    return [first] + [[LayerDef(block)] for _ in range(n_blocks)] + [last]


@dataclass(frozen=True)
class LayerOptions:
    """Per-run choices every family's layers honour (from the training config)."""

    attn: AttnOptions = AttnOptions()
    # Activation recompute in backward: False/"none", True/"full" (whole block), or "selective"
    # (keep matmul and attention outputs, recompute the cheap elementwise ops between them).
    grad_ckpt: bool | str = False
    compile: bool = False  # torch.compile each block (fixed shapes, one graph per block)
    max_z_loss: float = 0.0  # weight of gdGPT's max-z term (models.loss.MaxZLoss); read by the loss only
    fp8: str = "off"  # float8 training of the block linears (FP8_MODES; models.pipeline.float8_blocks)
    fp8_head: bool = False  # also the head's lm_head (models.pipeline.float8_blocks)
    kernels: str = "inductor"  # KERNELS: liger swaps in liger-kernel's ops (models.pipeline.liger_blocks)

    @property
    def ckpt_mode(self) -> str:
        mode = {True: "full", False: "none"}.get(self.grad_ckpt, self.grad_ckpt)
        if mode not in CKPT_MODES:
            raise ValueError(f"use_grad_ckpt must be one of true, false, {', '.join(CKPT_MODES)}; got {self.grad_ckpt!r}")
        return mode


CKPT_MODES = ("none", "full", "selective")
FP8_MODES = ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao.float8 recipes (engine resolves auto)
KERNELS = ("inductor", "liger")
# Ops whose outputs selective checkpointing keeps: the expensive ones. Everything else in a block
# (norms, rotary, activations, residual adds) is recomputed from them in backward.
_SAVED_OPS = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_efficient_attention", "_flash_attention_forward", "_efficient_attention_forward")


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {getattr(torch.ops.aten, name).default for name in _SAVED_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class BlockBase(nn.Module):
    """A transformer block as a pipeline layer: maps (hidden, position_ids) -> same.

    Subclasses implement `block(x, position_ids, mask)`; the attention mask comes from
    `attention_mask`, built here outside the block so the block itself can be compiled with
    fixed shapes. Activation checkpointing is done here, non-reentrant, so it works under
    DeepSpeed's pipeline without `checkpointable_layers`.
    """

    window: int | None = None  # sliding-window attention span, for families that have one

    def __init__(self, opts: LayerOptions):
        super().__init__()
        self.ckpt_mode, self.attn_opts = opts.ckpt_mode, opts.attn
        if opts.compile:
            self.compile_block()

    def block(self, x: torch.Tensor, position_ids: torch.Tensor, mask, cache: KVCache | None = None) -> torch.Tensor:
        raise NotImplementedError

    def compile_block(self) -> None:
        """Compile `block` for fixed shapes (one graph per block; no recompiles per step)."""
        self.block = torch.compile(self.block, dynamic=False)

    def run_block(self, x: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None = None):
        """`block`, recomputed in backward when checkpointing (a family whose block returns more
        than the hidden states, e.g. MoE router statistics, calls this from its own forward).
        cache: generation (KVCache of this block's attention; x holds only the new tokens)."""
        if cache is not None:
            return self.block(x, position_ids, cache.mask(x.shape[1], self.window, x.device), cache)
        mask = attention_mask(position_ids, self.attn_opts, self.window)
        if self.ckpt_mode == "none" or not (self.training and torch.is_grad_enabled()):
            return self.block(x, position_ids, mask)
        extra = {"context_fn": _selective_context} if self.ckpt_mode == "selective" else {}
        return torch.utils.checkpoint.checkpoint(self.block, x, position_ids, mask, use_reentrant=False, **extra)

    def forward(self, inputs, cache: KVCache | None = None):
        x, position_ids = inputs
        return self.run_block(x, position_ids, cache), position_ids
