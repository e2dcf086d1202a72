"""The experts' weight gradient added, in fp32, straight into their `main_grad`: for every expert e,
main_grad[e] += dy[rows of e]^T @ x[rows of e], the rows of e being [ends[e-1], ends[e]) of the
tokens sorted by expert (models/mixtral.py grouped_experts).

Why: the stacked expert weights (1.41B parameters per Mixtral-8x7B layer) otherwise get a bf16
gradient from `torch._grouped_mm`'s backward, which DeepSpeed's hook then reads and adds into the
fp32 buffer (~28 GB of memory traffic per layer per micro-batch, issue 32). models/fused_linear.py
does the same for every nn.Linear through cuBLAS (fp32 C, beta = 1); cuBLAS has no grouped GEMM
whose group bounds live on the device, so this is a Triton kernel of our own:

- grid (tiles of [out, in], experts); each program reads its expert's row range from the
  device-side `ends` (no host sync, no recompile per routing) and loops over it in BLOCK_K steps,
  rows past the end masked (any group size, no padding to the block);
- the fp32 tile of `main_grad` is read once, the product added and written once; an expert no
  token picked runs no step and writes nothing (exactly zero contribution);
- the tile order keeps the smaller operand in L2: the fastest-varying tile index walks the
  operand of fewer columns (x of gate_up_proj, dy of down_proj at Mixtral's shapes).

`grouped_wgrad_accumulate` (a torch.library custom op mutating `main_grad`, opaque to
torch.compile as fused_linear's is) runs the kernel on CUDA with bf16/fp16 operands when Triton is
importable; elsewhere the torch fallback: one `torch._grouped_mm` over the token dim with fp32
operands (CPU: exact products, fp32 sums, as fused_linear's CPU path) or, on CUDA without Triton,
the bf16 grouped GEMM then an fp32 add (the unfused traffic, still no hook). The kernel itself runs
on CPU in Triton's interpreter (TRITON_INTERPRET=1, tests/test_grouped_wgrad.py).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU torch wheels come without Triton: the torch fallback runs
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the first is the default; bench/moe_bench.py times each
# on the device. H100, Mixtral-8x7B's experts (bench/results/2026-12-07_h100x1.txt): 128 x 128 x 32, 4 warps,
# 4 stages ran gate_up's wgrad at 262 TF/s with 2048 tokens (128 x 128 x 64, 8 warps: 199) and 433 at 8192 (362);
# at 2048 tokens (~512 rows per expert) the fp32 read + write of main_grad bounds it, not the MMA.
CONFIGS = [(128, 128, 32, 4, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 32, 4, 4), (128, 64, 32, 4, 4)]

if triton is not None:
    @triton.jit
    def _grouped_wgrad_kernel(g_ptr, dy_ptr, x_ptr, ends_ptr, M, N,
                              stride_ge, stride_gm, stride_gn, stride_dyt, stride_dym, stride_xt, stride_xn,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              N_FASTEST: tl.constexpr, UPCAST: tl.constexpr):
        pid, e = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: E*M*N may pass 2^31
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        if N_FASTEST:  # consecutive programs share one dy column block and walk x (kept in L2)
            pid_m, pid_n = pid // tiles_n, pid % tiles_n
        else:
            pid_m, pid_n = pid % tiles_m, pid // tiles_m
        end = tl.load(ends_ptr + e)
        start = tl.load(ends_ptr + tl.maximum(e - 1, 0))
        start = tl.where(e > 0, start, 0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            offs_k = (k0 + rk).to(tl.int64)
            in_k = offs_k < end
            a = tl.load(dy_ptr + offs_k[:, None] * stride_dyt + offs_m[None, :] * stride_dym,
                        mask=in_k[:, None] & (offs_m[None, :] < M), other=0.0)  # [K, M]
            b = tl.load(x_ptr + offs_k[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                        mask=in_k[:, None] & (offs_n[None, :] < N), other=0.0)  # [K, N]
            if UPCAST:  # Triton's interpreter: its tl.dot reads bf16 tiles wrong (numpy has no bf16)
                a, b = a.to(tl.float32), b.to(tl.float32)  # exact: bf16 products fit fp32
            acc = tl.dot(tl.trans(a), b, acc)
        g = g_ptr + e * stride_ge + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
        rows = tl.where(end > start, M, 0)  # an empty group writes nothing
        mask = (offs_m[:, None] < rows) & (offs_n[None, :] < N)
        tl.store(g, tl.load(g, mask=mask, other=0.0) + acc, mask=mask)


def available() -> bool:
    return triton is not None


def triton_grouped_wgrad(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, ends: torch.Tensor,
                         config: tuple | None = None) -> None:
    """The Triton kernel: main_grad [E, M, N] fp32 += per group e: grad_out[s:t]^T [M, K_e] @ x[s:t] [K_e, N]
    (grad_out [T, M], x [T, N], ends [E] int32 cumulative row ends on the device)."""
    E, M, N = main_grad.shape
    assert main_grad.dtype == torch.float32 and grad_out.shape == (x.shape[0], M) and x.shape[1] == N
    assert ends.dtype == torch.int32 and ends.shape == (E,)
    bm, bn, bk, warps, stages = config or CONFIGS[0]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), E)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    kw = {} if interpret else dict(num_warps=warps, num_stages=stages)
    _grouped_wgrad_kernel[grid](main_grad, grad_out, x, ends, M, N, *main_grad.stride(), *grad_out.stride(),
                                *x.stride(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, N_FASTEST=N <= M,
                                UPCAST=interpret, **kw)


def torch_grouped_wgrad(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> None:
    """The fallback: torch._grouped_mm over the token dim (2D x 2D, groups along K; an empty group's
    product is zero), fp32 operands where the device allows (CPU), else the operands' dtype then an fp32 add."""
    if grad_out.is_cuda:
        main_grad.add_(torch._grouped_mm(grad_out.t(), x, offs=ends).float())
    else:
        main_grad.add_(torch._grouped_mm(grad_out.t().float(), x.float(), offs=ends))


@torch.library.custom_op("ppllm::grouped_wgrad_accumulate", mutates_args=("main_grad",))
def grouped_wgrad_accumulate(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor,
                             ends: torch.Tensor) -> None:
    """main_grad[e] += grad_out[rows of e]^T @ x[rows of e] in fp32, e's rows ending at ends[e]."""
    if main_grad.is_cuda and triton is not None and grad_out.dtype in (torch.bfloat16, torch.float16):
        triton_grouped_wgrad(main_grad, grad_out, x, ends)
    else:
        torch_grouped_wgrad(main_grad, grad_out, x, ends)


@grouped_wgrad_accumulate.register_fake
def _(main_grad, grad_out, x, ends) -> None:
    return None


class _GroupedLinear(torch.autograd.Function):
    """x [T, in] -> [T, out], rows of group e through weight[e] [out, in] (`torch._grouped_mm`, group
    ends `ends`); backward: the input gradient by `torch._grouped_mm` as autograd's, the weight's
    accumulated into `main_grad` [E, out, in] fp32 and returned as None (no `.grad`, so DeepSpeed's
    hook never runs for it). `main_grad` is held on ctx, not saved, as in fused_linear._Linear: other
    micro-batches' backwards add into it between this forward and its backward."""

    @staticmethod
    def forward(x, weight, ends, main_grad):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, ends, main_grad = inputs
        ctx.save_for_backward(x, weight, ends)
        ctx.main_grad = main_grad

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, ends = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch._grouped_mm(grad_out, weight, offs=ends) if ctx.needs_input_grad[0] else None
        grouped_wgrad_accumulate(ctx.main_grad, grad_out, x, ends)
        return grad_x, None, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, main_grad=None) -> torch.Tensor:
    """`torch._grouped_mm(x, weight^T, offs=ends)`; with `main_grad` (and a weight that trains), the
    weight gradient goes into it in fp32 (_GroupedLinear) instead of autograd's bf16 `.grad`."""
    if main_grad is None or not weight.requires_grad:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends)
    return _GroupedLinear.apply(x, weight, ends, main_grad)
