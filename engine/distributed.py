"""Process-group set-up shared by training, tests and tools."""
from __future__ import annotations

import atexit
import os
import sys

import torch

_started = False  # init_distributed ran in this process (leave() then skips interpreter teardown)


def on_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed() -> None:
    """Initialise DeepSpeed's comm layer: NCCL on GPU, gloo on CPU.

    On CPU DeepSpeed would JIT-compile its shared-memory all-reduce op (~1 min per cold
    start); gloo is what we test with, so mark that op unavailable before DeepSpeed probes it.
    """
    import deepspeed
    import deepspeed.comm as dist

    global _started
    _started = True
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


def leave(code) -> None:
    """End a script's process with `code` (SystemExit's meaning). After a distributed run, once
    stdio is flushed and atexit handlers have run, skip interpreter teardown (os._exit): gloo's
    worker threads still free finished collectives' tensors, which takes the GIL, and one caught
    by finalization aborts the process ("terminate called without an active exception",
    pytorch#190489): a run that had finished and saved exited with SIGABRT about 1 time in 15
    on 2 CPU ranks. destroy_process_group does not join those threads (the groups live on in
    DeepSpeed's engine), so there is no earlier point at which they are known to be idle."""
    if not _started:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # logging, monitors (wandb, tensorboard), weakref finalizers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()
