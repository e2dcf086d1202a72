"""Position encodings shared by the families: rotary tables (every HF rope type we support) and ALiBi.

Within a generation step all layers share one set of tables (kv_cache.per_step).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .kv_cache import KVCache, StaticKVCache, per_step
from .masks import document_ids


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
                cache: KVCache | StaticKVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def alibi_bias(slopes: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
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
