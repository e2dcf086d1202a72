"""Activation offload (`offload_activations`): what a recomputed block keeps for its backward goes
to CPU memory in the forward and comes back for the backward.

Under full recompute (`use_grad_ckpt: full`) a block keeps only its input, saved through
autograd's saved-tensor hooks by torch.utils.checkpoint's non-reentrant implementation (its
`_NoopSaveInputs`, outside the checkpoint's own hooks). `offloaded()` wraps the checkpoint call in
hooks that copy each such floating-point tensor of at least MIN_BYTES into pinned host memory on
a side stream (the compute stream goes on; the allocator is told the GPU tensor is in use until
the copy is done, `record_stream`), and copy it back on the compute stream when backward
unpacks it (non_blocking from pinned memory). A 7B stage at 128k tokens keeps 1 GiB per block
(bf16 [128k, 4096]) this way: 16 GiB per 16-block stage and micro-batch in flight, moved to the host.
The same as torch.autograd.graph.save_on_cpu(pin_memory=True), except that save_on_cpu copies on
the compute stream (each block's forward waits for its input's copy) and offloads every tensor.

Not offloaded: integer tensors (position ids) and tensors under MIN_BYTES, which stay where they are.
On a CPU-only machine the hooks still copy (the same code path, tests/test_long_context.py).
"""
from __future__ import annotations

import contextlib

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device: a copy each way costs more than they hold


class Offloader:
    """saved-tensor hooks moving large floating-point tensors to (pinned) host memory; counts what it
    moved (`packed_bytes`, tests and the bench read it)."""

    def __init__(self):
        self.packed_bytes = 0
        self._stream = None

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def pack(self, t: torch.Tensor):
        if not t.is_floating_point() or t.numel() * t.element_size() < MIN_BYTES:
            return t
        self.packed_bytes += t.numel() * t.element_size()
        if t.device.type != "cuda":  # CPU runs (tests): a host copy all the same
            return (t.device, t.detach().clone(), None)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream = self._side_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written
        with torch.cuda.stream(stream):
            host.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)  # its memory is not reused before the copy has read it
        return (t.device, host, done)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        if done is None:
            return host.to(device)
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


_OFFLOADER = Offloader()


def offloaded(enabled: bool):
    """Context for a block's checkpointed forward: its saved inputs go to host memory (enabled), or nothing."""
    return _OFFLOADER.hooks() if enabled else contextlib.nullcontext()


def packed_bytes() -> int:
    """Bytes offloaded since the process started (all blocks)."""
    return _OFFLOADER.packed_bytes
