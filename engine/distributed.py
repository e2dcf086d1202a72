"""Process-group set-up shared by training, tests and tools."""
from __future__ import annotations

import os

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed() -> None:
    """Initialise DeepSpeed's comm layer: NCCL on GPU, gloo on CPU.

    On CPU DeepSpeed would JIT-compile its shared-memory all-reduce op (~1 min per cold
    start); gloo is what we test with, so mark that op unavailable before DeepSpeed probes it.
    """
    import deepspeed
    import deepspeed.comm as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if not on_gpu():
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", auto_mpi_discovery=False)
    if on_gpu():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def comm_tensor(values) -> torch.Tensor:
    """A small tensor on the device the process group communicates from (NCCL: this GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu() else None
    return torch.tensor(values, device=device)


def rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()
