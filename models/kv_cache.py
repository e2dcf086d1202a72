"""Generation state: per-layer key/value caches (growing `KVCache`, CUDA-graph-friendly `StaticKVCache`),
the `DecodeCursor` they share, and the per-step memo (`per_step`) all layers read.
"""
from __future__ import annotations

import torch

from .masks import offset_mask


def per_step(cache, key, compute):
    """compute() once per generation step for all layers: kept in the caches' shared step memo
    (`cache.step`, which OurLM clears before each step, so a captured decode step computes it
    inside the capture); without one (training, a cache of its own), every call."""
    if cache is None or cache.step is None:
        return compute()
    if key not in cache.step:
        cache.step[key] = compute()
    return cache.step[key]



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
        return offset_mask(self.length, s, window, device)

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
        return offset_mask(self.cursor.length, s, window, device)

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
