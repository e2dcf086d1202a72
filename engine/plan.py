"""Planning before allocating: a per-layer cost model, `parts: auto`, and the dry-run report.

Cost model (per pipeline layer as `parts` counts them, from config.json alone; parameter
counts come from the family's layers built on the meta device, so nothing is allocated):

  time    forward FLOPs per token. embedding ~0; block = 2 x active matmul params (MoE: router +
          top_k/num_experts of the experts) + causal attention scores 2*s*d_q (QK^T and PV over
          s/2 keys on average); head = 2*h*vocab + ~10*vocab (softmax/cross-entropy). Training
          costs 3x forward (4x for blocks under full recompute, ~3.3x selective). A block's FLOPs
          are divided by its family's measured efficiency relative to llama (FAMILY_EFFICIENCY),
          so every time is in llama-equivalent FLOPs: what llama's kernels would take as long for.
  memory  bytes per GPU of a stage = parameters x bytes/param (precision, ZeRO stage, offload,
          optimizer: see `static_bytes_per_param`) + activations: under 1F1B stage s keeps up to
          min(P - s, M) micro-batches in flight, each micro*seq tokens x the per-token bytes of
          its blocks (see `block_act_bytes`), plus the head's logits on the last stage.

`auto_parts` splits the layers into contiguous stages minimising the slowest stage's time,
subject to each stage's estimated peak fitting the memory budget (ties: the smaller peak).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from models import Dims
from models.block_base import BlockBase
from models.lora import LoraSpec

GiB = 2**30
GPU_FIXED_GIB = 0.5  # cuBLAS/NCCL workspaces and allocator slack seen by max_memory_allocated

# ---------------------------------------------------------------------- measured efficiency per family
# How fast each family's blocks train per FLOP relative to llama's: the MFU of the family's
# stage-sized bench model divided by llama-7B's, measured in the same device call (issue 25):
#   FAMILIES="bloom-7b1 baichuan2-7b baichuan2-13b chatglm3-6b mixtral-8x7b" bash bench/run_gpu.sh \
#     "llama-7b 2048 --family llama-7b $C; bloom-7b1 2048 --family bloom-7b1 $C; ..."
# and the table's "/llama" column (bench/bench_train.py; MFU counts 6 * N_active + attention, so
# MoE is charged for top_k experts only). llama is the baseline, 1.0 by definition, and every
# family is 1.0 until measured. The cost model divides a block's FLOPs by this, so `parts: auto`
# weighs a slower family's blocks against its (GEMM-bound, llama-like) embedding and head, and the
# dry run's throughput estimate uses the family's own rate.
# Measured (issue 32's table): one H100 80GB, one lease, torch 2.11, DeepSpeed 0.19.8, seq 2048, micro
# 4 x 4, 5 steps, product defaults (fused fp32 accumulation), the bench/steps_b_h100.txt stage sizes
# (bench_train.py run --family X: llama-7b 8 blocks 59.7% MFU, bloom-7b1 6, chatglm3-6b 7, baichuan2-7b
# 6, baichuan2-13b 3, mixtral-8x7b 2), each MFU / llama-7b's. baichuan: the 7B (rotary) row; the 13B
# (ALiBi) measured 1.144. mixtral: measured before its experts joined the wgrad fusion (issue 32);
# rerun bench/steps_moe.txt's stage steps and replace.
FAMILY_EFFICIENCY = {
    "llama": 1.0,
    "bloom": 0.949,
    "baichuan": 1.103,
    "chatglm": 1.037,
    "mixtral": 0.698,
}
# llama's MFU of one pipeline stage, bubble excluded: the dry run's absolute throughput estimate
# (bench/README.md, H200 x2, 2026-11-23: 56.5% MFU at pp=2, seq 2048, micro 4 x 16, i.e. with a
# 5.9% bubble -> ~0.60 per busy stage). Replace with the latest llama-7b row of the same bench.
PEAK_FLOPS = 989e12  # H100/H200 dense bf16: what MFU is a share of (training/metrics.py too)
LLAMA_STAGE_MFU = 0.60


def family_efficiency(family) -> float:
    """FAMILY_EFFICIENCY of a family module (models.<name>); 1.0 for one not measured."""
    return FAMILY_EFFICIENCY.get(family.__name__.split(".")[-1], 1.0)


# ---------------------------------------------------------------------- fp8: auto, by shape
# Training speed with torchao float8 tensorwise over bf16 (bf16 time / fp8 time, > 1: fp8 faster) by
# (hidden size, micro-batch rows), seq 2048, blocks compiled, one H100/H200; `fp8: auto` picks fp8
# only at a shape measured faster here (fp8_auto). Sources:
#   (2048, 2): 0.82. bench/fp8_gate.py on one H100 (issue 32's lease): the 1B llama shape, micro 2 x seq
#     2048, compile_blocks, pp=1, 1,000 steps: fp8 23,442 tok/s vs bf16 28,677.
#   (4096, 4): 1.18. bench/fp8_sweep.py --hidden 4096 --micro 4 on one H100 80GB (torch 2.11, 2026-12-07,
#     bench/results/2026-12-07_h100x1.txt): one llama-7B block fwd + bwd, bf16 16.44 ms, fp8 13.97 ms.
#   (4096, 8): 1.37. bench/README.md "one H200" table (2026-12-01): a pp=2 stage of the 7B llama shape
#     (16 blocks), compile_blocks, fp8 36,690 vs bf16 26,713 tok/s at micro 8 (bf16 then without the
#     fused wgrad accumulation, +4.1% since: still > 1.3).
# The sweep over hidden {2048, 4096, 5120, 8192} x micro {1, 2, 4, 8} is bench/fp8_sweep.py (steps
# fp8_* in bench/steps_moe.txt): it prints its rows as this dict's literal; add them with their source.
# Measured on llama blocks: MoE models stay bf16 (fp8 leaves the experts in bf16 and takes the fused
# fp32 wgrad accumulation away from them).
FP8_SPEEDUP = {
    (2048, 2): 0.82,
    (4096, 4): 1.18,
    (4096, 8): 1.37,
}


def fp8_auto(cfg, dims, pipeline: bool = True, machine=None) -> tuple[bool, str]:
    """What `fp8: auto` picks: (fp8?, why), the run's own reasons first. dims: the model's
    models.Dims, or a function giving them (called only when the decision gets to the shape).
    machine: a function saying why this machine cannot run fp8, or None where it can
    (engine/training/deepspeed_setup.py resolved_fp8 checks FP8 tensor cores and torchao); None
    for the dry run, which plans for an H100/H200."""
    if cfg.dtype != "bf16":
        return False, f"the run is {cfg.dtype}, fp8 needs bf16"
    if not pipeline:
        return False, "fp8 runs on the pipeline path (train_ds.py) only"
    if getattr(cfg.lora, "base_quant", "none") != "none":
        return False, f"lora.base_quant: {cfg.lora.base_quant} stores the base in 4 bits, nothing for fp8 to cast"
    if not cfg.compile_blocks:
        return False, "fp8 is measured with compiled blocks only (compile_blocks: false)"
    cannot = machine() if machine else None
    if cannot:
        return False, cannot
    dims = dims() if callable(dims) else dims
    if dims.experts:
        return False, "fp8 is measured on dense blocks; an MoE's experts stay bf16 and keep the fused fp32 wgrad"
    hidden, micro = dims.hidden, cfg.micro_batch
    ratio = FP8_SPEEDUP.get((hidden, micro))
    if ratio is None:
        return False, f"fp8 not measured at hidden {hidden}, micro {micro} (engine/plan.py FP8_SPEEDUP)"
    verdict = "faster" if ratio > 1.0 else "not faster"
    return ratio > 1.0, f"fp8 measured {ratio:.2f}x bf16's speed at hidden {hidden}, micro {micro}: {verdict}"


# ---------------------------------------------------------------------- the run being planned
@dataclass
class Setup:
    seq: int = 2048
    micro: int = 1
    n_micro: int = 1  # micro-batches per step per pipeline (gradient accumulation)
    pp: int = 1
    dp: int = 1
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    zero: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    ckpt: str = "none"  # none | selective | full
    optimizer: str = "AdamW"
    compiled: bool = False
    flash: bool = True  # attention kernel keeps O(s) state (flash/flex); False: dense probs (CPU SDPA math, ALiBi)
    gpu: bool = True
    lora: object = None  # models.lora.LoraSpec: only the adapters (+ modules_to_save) train, the base is frozen
    packed: bool = False  # packing: on GPU, ALiBi runs in FlexAttention (a score_mod, O(s) state) instead of dense SDPA
    offload: bool = False  # offload_activations: full recompute's block inputs live in CPU memory (models/offload.py)
    sp: int = 1  # seq axis: ranks sharing each row (dp counts them too: ZeRO shards over data x seq)
    head_chunk: int = 0  # head_chunk_tokens: the head's logits exist one chunk at a time (models/chunked_loss.py)
    base_quant: str = "none"  # LoRA's frozen block linears: none (in `dtype`) or nf4 (models/quant.py)

    @classmethod
    def from_config(cls, cfg, gpu: bool = True, pipeline: bool = True) -> "Setup":
        zero = cfg.ds.get("zero_optimization", {}) or {}
        ckpt = {True: "full", False: "none"}.get(cfg.use_grad_ckpt, cfg.use_grad_ckpt)
        return cls(seq=cfg.max_seq_len, micro=cfg.micro_batch, n_micro=cfg.grad_accum,
                   pp=cfg.pipe_dim if pipeline else 1, sp=cfg.seq_dim,
                   dp=(cfg.data_dim if pipeline else cfg.pipe_dim * cfg.data_dim) * cfg.seq_dim,
                   dtype=cfg.dtype, zero=cfg.zero_stage,
                   offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") != "none",
                   offload_param=(zero.get("offload_param") or {}).get("device", "none") != "none",
                   ckpt=ckpt, optimizer=(cfg.ds.get("optimizer") or {}).get("type", "AdamW"),
                   compiled=cfg.compile_blocks and gpu, flash=gpu, gpu=gpu, lora=LoraSpec.of(cfg.lora),
                   packed=cfg.packing, offload=cfg.offload_activations, head_chunk=cfg.head_chunk_tokens,
                   base_quant=getattr(cfg.lora, "base_quant", "none") if LoraSpec.of(cfg.lora) else "none")

    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def tokens(self) -> int:
        """Tokens a rank holds per micro-batch (the seq axis: its slice of each row)."""
        return self.micro * self.seq // self.sp

    def in_flight(self, stage: int) -> int:
        return max(1, min(self.pp - stage, self.n_micro))

    @property
    def bubble(self) -> float:
        return (self.pp - 1) / (self.n_micro + self.pp - 1)


# ---------------------------------------------------------------------- per-layer costs
@dataclass
class LayerCost:
    kind: str  # embed | block | head
    params: int  # parameters this layer owns (a tied head twin counts the shared weight again)
    flops: float  # forward FLOPs per token
    act: float = 0.0  # bytes per token kept for backward (no recompute)
    ckpt_act: float = 0.0  # bytes per token kept under the configured recompute
    tie: str | None = None
    tie_params: int = 0  # of `params`, those shared with another stage's twin
    trainable: int | None = None  # LoRA: adapters + modules_to_save (None: all of `params`)
    saved: int = 0  # LoRA: of `params` and `trainable`, the base parameters trained whole (modules_to_save)
    quant: int = 0  # lora.base_quant: nf4: of `params`, those stored in 4 bits (frozen block linears)
    quant_bytes: float = 0.0  # ... and the bytes they take as torchao stores them
    quant_max: int = 0  # ... and the largest one's elements (its dequantized copy is a transient: dequant_bytes)


def block_act_bytes(d: Dims, s: Setup, mode: str) -> float:
    """Bytes per token one block keeps for backward.

    eager, no recompute: block input, norm outputs, q/k/v before and after rotary, attention
    output (+ its reshaped copy for o_proj), the residual sum, and the MLP's matmul outputs and
    activation (gated: gate, up, act(gate), act*up; plain: fc1 out, act out); norms keep an fp32
    copy under bf16. Dense attention (no flash kernel) adds the probabilities (n_heads x s/2 on
    average... kept whole: s). compiled: what a min-cut graph keeps (input, q, k, v, attention
    output, residual, gate/up). selective: matmul and attention outputs + block input. full: the
    block input only (plus one block's full set while it is recomputed, counted per stage).
    """
    e, h, dq, dkv, f = s.act_bytes, d.hidden, d.q_dim, d.kv_dim, d.ffn
    mlp_in = max(d.top_k, 1)  # MoE: each token runs top_k experts
    if mode == "full":
        return e * h
    if mode == "selective":
        mlp = (2 * f if d.gated else f) * mlp_in
        return e * (3 * h + 2 * dq + 2 * dkv + mlp) + 4 * d.experts
    if s.compiled:
        mlp = (2 * f if d.gated else f) * mlp_in
        return e * (2 * h + 2 * dq + 2 * dkv + mlp)
    mlp = (4 * f if d.gated else 3 * f) * mlp_in + (h * mlp_in if d.experts else 0)
    norms = 2 * h * (4 if e == 2 else 0)
    attn = e * (4 * dq + 3 * dkv) + 4 * d.heads  # + log-sum-exp
    if not s.flash or (d.positional == "alibi" and not s.packed):  # packed ALiBi: flex score_mod, no probs kept
        attn += (e + 1) * d.heads * s.seq  # probabilities + mask
    return e * (4 * h + mlp) + attn + norms + 4 * 2 * d.experts


def head_act_bytes(d: Dims, s: Setup) -> float:
    """Per token on the last stage: logits (model dtype) + their gradient, and without a fused
    (compiled) cross-entropy the fp32 upcast and log-softmax. head_chunk: the logits of one chunk
    at a time (averaged over the micro-batch's tokens, since the caller multiplies by them)."""
    e = s.act_bytes
    ce = 0 if s.compiled else (8 if e == 2 else 4)
    logits = d.vocab * (2 * e + ce)
    if s.head_chunk:
        logits *= min(s.head_chunk, s.tokens) / s.tokens
    return e * 2 * d.hidden + logits


_PARAMS_CACHE: dict = {}


def _group_params(family, args) -> tuple:
    """(params, tie key, tie params) per user layer, from meta-device shapes."""
    from models.pipeline import layer_groups

    from engine.model import expected_shapes

    key = (family.__name__, repr(args))
    if key in _PARAMS_CACHE:
        return _PARAMS_CACHE[key]
    shapes = expected_shapes(family, args)
    out, i = [], 0
    for group in layer_groups(family, args):
        total = tie_params = 0
        tie = None
        for d in group:
            n = sum(math.prod(v) for v in shapes[i].values())
            total += n
            if d.tie is not None:
                tie, tie_params = d.tie, tie_params + n
            i += 1
        out.append((total, tie, tie_params))
    _PARAMS_CACHE[key] = tuple(out)
    return _PARAMS_CACHE[key]


def layer_costs(family, args, setup: Setup) -> list[LayerCost]:
    d = family.dims(args)
    groups = _group_params(family, args)
    costs = []
    last = len(groups) - 1
    trainable = _cached(("trainable", family.__name__, repr(args), repr(setup.lora)),
                        lambda: _group_trainable(family, args, setup.lora)) if setup.lora else [None] * len(groups)
    frozen = _cached(("frozen", family.__name__, repr(args), repr(setup.lora), setup.base_quant, setup.act_bytes),
                     lambda: _group_frozen(family, args, setup)) if setup.lora else [(0, 0, 0.0, 0)] * len(groups)
    efficiency = family_efficiency(family)
    for idx, (params, tie, tie_params) in enumerate(groups):
        if idx == 0:
            costs.append(LayerCost("embed", params, flops=0.0, act=8.0, ckpt_act=8.0, tie=tie, tie_params=tie_params))
        elif idx == last:
            flops = 2.0 * d.hidden * d.vocab + 10.0 * d.vocab
            act = head_act_bytes(d, setup)
            costs.append(LayerCost("head", params, flops, act, act, tie, tie_params))
        else:
            active = params - (d.experts - d.top_k) * d.mlp_params  # MoE: top_k of the experts run
            flops = (2.0 * active + 2.0 * setup.seq * d.q_dim) / efficiency  # llama-equivalent FLOPs
            costs.append(LayerCost("block", params, flops, block_act_bytes(d, setup, "none"),
                                   block_act_bytes(d, setup, setup.ckpt)))
        costs[-1].trainable = trainable[idx]
        costs[-1].saved, costs[-1].quant, costs[-1].quant_bytes, costs[-1].quant_max = frozen[idx]
    return costs


def _group_frozen(family, args, setup: Setup) -> list[tuple[int, int, float, int]]:
    """LoRA: (base parameters trained whole, parameters stored in 4 bits, their bytes, the largest 4-bit
    weight's elements) per user layer;
    4-bit with lora.base_quant: nf4: each block's frozen quantizable linears (models/quant.py) at
    torchao's storage (nf4_nbytes)."""
    from models.lora import is_trainable
    from models.pipeline import layer_groups
    from models.quant import nf4_nbytes, quantizable

    from engine.model import expected_shapes

    shapes = expected_shapes(family, args)
    linears = {f"{name}.weight": m.weight.numel() for name, m in quantizable(family, args).items()}
    keys, i, out = family.hf_keys(args), 0, []
    for group in layer_groups(family, args):
        saved, n, nbytes, largest = 0, 0, 0.0, 0
        for d in group:
            saved += sum(math.prod(v) for k, v in shapes[i].items() if is_trainable(k, keys[i], setup.lora))
            if issubclass(d.cls, BlockBase):
                for k, numel in linears.items() if setup.base_quant == "nf4" else ():
                    if not is_trainable(k, keys[i], setup.lora):
                        n, nbytes = n + numel, nbytes + nf4_nbytes(numel, setup.act_bytes)
                        largest = max(largest, numel)
            i += 1
        out.append((saved, n, nbytes, largest))
    return out


def _cached(key, compute):
    """compute() once per key (the meta-device model walks are the slow part of layer_costs, which the
    dry run's long-context table calls 16 times)."""
    if key not in _PARAMS_CACHE:
        _PARAMS_CACHE[key] = compute()
    return _PARAMS_CACHE[key]


def _group_trainable(family, args, spec) -> list[int]:
    """LoRA: trainable parameters per user layer: each block's adapters, and the parameters of
    modules_to_save (whole modules, matched as PEFT matches them)."""
    from models.lora import adapter_numel, is_trainable
    from models.pipeline import layer_groups

    from engine.model import expected_shapes

    shapes, keys, i, out = expected_shapes(family, args), family.hf_keys(args), 0, []
    for group in layer_groups(family, args):
        n = 0
        for d in group:
            n += sum(math.prod(v) for k, v in shapes[i].items() if is_trainable(k, keys[i], spec))
            n += adapter_numel(family, args, spec, keys[i]) if issubclass(d.cls, BlockBase) else 0  # per block: a
            # regex or layers_to_transform may pick blocks apart
            i += 1
        out.append(n)
    return out


# ---------------------------------------------------------------------- per-stage estimate
def static_bytes_per_param(s: Setup) -> dict[str, float]:
    """Bytes per parameter on the GPU: weights, gradients, optimizer (master weights + states).

    bf16 under the pipeline runs DeepSpeed's BF16_Optimizer (ZeRO-1): bf16 weights and grads,
    a full fp32 gradient-accumulation buffer, fp32 master + states sharded over dp. fp32: weights,
    grads, states (sharded over dp from ZeRO-1). ZeRO-2 shards grads, ZeRO-3 weights too.
    Offloaded optimizer: master + states (and the fp32 grad copy) live in CPU memory.
    """
    states = 4 if s.optimizer == "Lion" else 8
    dp_opt = s.dp if s.zero >= 1 else 1
    dp_grad = s.dp if s.zero >= 2 else 1
    dp_w = s.dp if s.zero >= 3 else 1
    if s.dtype == "fp32":
        w, g, opt = 4.0, 4.0, states
    else:
        w, g, opt = 2.0, 2.0 + (4.0 if s.zero == 1 and not s.offload_optimizer else 0.0), 4.0 + states
    if s.offload_optimizer:
        opt = 0.0
    if s.offload_param:
        w = 0.0
    return {"weights": w / dp_w, "grads": g / dp_grad, "optimizer": opt / dp_opt}


@dataclass
class StageEstimate:
    stage: int
    layers: int
    blocks: int
    params: int
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float
    time: float  # training FLOPs per token of a micro-batch through this stage
    extra: dict = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.extra.get("fixed", 0.0)
                + self.extra.get("gathered", 0.0) + self.extra.get("dequant", 0.0))


def _ckpt_factor(setup: Setup) -> float:
    return {"none": 3.0, "selective": 3.3, "full": 4.0}[setup.ckpt]


def stage_estimate(costs: list[LayerCost], lo: int, hi: int, stage: int, setup: Setup) -> StageEstimate:
    layers = costs[lo:hi]
    params, seen = 0, set()
    for c in layers:
        if c.tie is not None and c.tie in seen:  # both twins on one stage: one copy
            params += c.params - c.tie_params
            continue
        seen.add(c.tie)
        params += c.params
    train = params if setup.lora is None else sum(c.trainable or 0 for c in layers)
    per = static_bytes_per_param(setup)
    # LoRA: the frozen base is weights alone, in the run's precision (no gradient, master or state);
    # base_quant nf4: its block linears at torchao's NF4 storage
    quant = sum(c.quant for c in layers)
    saved = train if setup.lora is None else sum(c.saved for c in layers)  # trained base params (adapters: not in params)
    base_w = ((params - saved - quant) * setup.act_bytes + sum(c.quant_bytes for c in layers)) \
        / (setup.dp if setup.zero >= 3 else 1)
    toks = setup.tokens
    n = setup.in_flight(stage)
    act = sum((c.ckpt_act if c.kind == "block" else 0.0) for c in layers) * toks * n
    host = 0.0
    blocks = [c for c in layers if c.kind == "block"]
    if setup.offload and setup.ckpt == "full" and blocks:  # the kept block inputs wait in CPU memory; one is back
        host, act = act, max(c.ckpt_act for c in blocks) * toks
    act += sum(c.act for c in layers if c.kind == "embed") * toks * n
    act += max((c.act for c in layers if c.kind == "head"), default=0.0) * toks  # freed before the next micro-batch
    if setup.ckpt != "none" and blocks:  # one block's full activations while it is recomputed
        act += max(c.act for c in blocks) * toks
    head = 4.0 if setup.head_chunk else 3.0  # chunked: each chunk's projection runs again in backward
    time = sum(c.flops * (_ckpt_factor(setup) if c.kind == "block" else head if c.kind == "head" else 3.0)
               for c in layers)
    fixed = GPU_FIXED_GIB * GiB if setup.gpu else 0.0
    dequant = dequant_bytes(max((c.quant_max for c in layers), default=0), setup.act_bytes)
    return StageEstimate(stage, len(layers), len(blocks), params, base_w + train * per["weights"], train * per["grads"],
                         train * per["optimizer"], act, time, {"fixed": fixed, "trainable": train, "host": host,
                                                              "dequant": dequant})


def dequant_bytes(numel: int, elem_bytes: int) -> float:
    """lora.base_quant: nf4: the transient of the stage's largest 4-bit weight (`numel` elements) while
    its linear runs, forward or backward (models/quant.py nf4_linear): its dequantized copy plus
    one dequantization step's buffers, numel * elem_bytes + min(numel, DEQUANT_CHUNK) * DEQUANT_CHUNK_BYTES
    (7B's gate_up: 90M elements, 0.26 GiB in bf16). Nothing dequantized is kept for backward."""
    from models.quant import DEQUANT_CHUNK, DEQUANT_CHUNK_BYTES

    return float(numel * elem_bytes + min(numel, DEQUANT_CHUNK) * DEQUANT_CHUNK_BYTES) if numel else 0.0


def estimate(costs: list[LayerCost], parts: list[int], setup: Setup) -> list[StageEstimate]:
    out, lo = [], 0
    for s, p in enumerate(parts):
        out.append(stage_estimate(costs, lo, lo + p, s, setup))
        lo += p
    return out


def auto_parts(costs: list[LayerCost], setup: Setup, mem_bytes: float | None = None) -> list[int]:
    """Contiguous split into setup.pp stages (>= 1 layer each) minimising the slowest stage's
    time; splits with a stage whose estimated peak exceeds `mem_bytes` lose to any split that fits
    (when none fits, the fastest is taken and the dry run warns).
    Ties (within 0.1%) go to the smaller largest peak."""
    n, P = len(costs), setup.pp
    if P <= 1:
        return [n]
    if n < P:
        raise ValueError(f"{n} pipeline layers cannot fill {P} stages")

    @lru_cache(maxsize=None)
    def cell(s: int, lo: int, hi: int):
        e = stage_estimate(costs, lo, hi, s, setup)
        over = float(e.peak > mem_bytes) if mem_bytes else 0.0
        return over, e.time, e.peak

    def better(a, b):  # (over, time, peak) lexicographic, time compared with a tolerance
        if b is None:
            return True
        if a[0] != b[0]:
            return a[0] < b[0]
        if abs(a[1] - b[1]) > 1e-3 * max(a[1], b[1]):
            return a[1] < b[1]
        return a[2] < b[2]

    # best[s][lo] = (worst (over, time, peak) of stages s.. on layers lo..n, split)
    best: list[dict[int, tuple]] = [dict() for _ in range(P + 1)]
    best[P][n] = ((0.0, 0.0, 0.0), [])
    for s in range(P - 1, -1, -1):
        for lo in range(s, n - (P - s) + 1):
            choice = None
            for hi in range(lo + 1, n - (P - s - 1) + 1):
                if hi not in best[s + 1]:
                    continue
                here, (rest, split) = cell(s, lo, hi), best[s + 1][hi]
                worst = (max(here[0], rest[0]), max(here[1], rest[1]), max(here[2], rest[2]))
                if better(worst, choice[0] if choice else None):
                    choice = (worst, [hi - lo] + split)
            if choice:
                best[s][lo] = choice
    return best[0][0][1]


# ---------------------------------------------------------------------- config-level entry points
def resolve_parts(cfg, family, args, gpu: bool = True, mem_gib: float | None = None) -> list[int]:
    """cfg's parts, or the cost model's split when they are 'auto'."""
    if isinstance(cfg.model_topo.parts, list):
        return list(cfg.model_topo.parts)
    setup = Setup.from_config(cfg, gpu=gpu)
    return auto_parts(layer_costs(family, args, setup), setup, mem_gib * GiB if mem_gib else None)


def resolve_auto_parts(cfg, model, kind: str = "pipeline", log=print) -> list[int] | str | None:
    """cfg's parts with `auto` replaced by the cost model's split (explicit parts, the ZeRO path
    and a layout validate will reject anyway come back as they are); the budget is this GPU's
    memory. cfg itself is not changed."""
    parts = cfg.model_topo.parts
    if kind != "pipeline" or isinstance(parts, list) or model.n_layers < cfg.pipe_dim:
        return parts
    import torch

    gpu = torch.cuda.is_available()
    mem = torch.cuda.get_device_properties(0).total_memory / GiB if gpu else None
    parts = resolve_parts(cfg, model.family, model.args, gpu=gpu, mem_gib=mem)
    log(f"parts: auto -> {parts} (slowest stage minimised by engine/plan.py's cost model)")
    return parts


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def report(cfg, family, args, world_size: int, gpu_mem_gib: float = 80.0, pipeline: bool = True) -> tuple[str, list]:
    """The dry-run text and the per-stage estimates (cfg already validated)."""
    setup = Setup.from_config(cfg, gpu=True, pipeline=pipeline)
    costs = layer_costs(family, args, setup)
    if pipeline:
        parts = resolve_parts(cfg, family, args, gpu=True, mem_gib=gpu_mem_gib)
    else:
        parts = [len(costs)]
    stages = estimate(costs, parts, setup)
    name = family.__name__.split(".")[-1]
    total = sum(c.params for c in costs) - sum(c.tie_params for c in costs[1:] if c.tie)
    opt = setup.optimizer + (" (offloaded)" if setup.offload_optimizer else "")
    if not pipeline:
        return _zero_report(cfg, name, total, setup, stages[0], costs, world_size, gpu_mem_gib, opt), stages
    lines = [f"dry run: {name}, {total / 1e9:.2f}B parameters, {len(costs)} pipeline layers; world {world_size} = "
             f"pp {setup.pp} x dp {setup.dp // setup.sp}" + (f" x seq {setup.sp} (each rank {setup.seq // setup.sp} "
                                                             f"tokens of every row)" if setup.sp > 1 else ""),
             f"  {setup.dtype}, ZeRO-{setup.zero}, optimizer {opt}, grad ckpt {setup.ckpt}, compiled "
             f"{'yes' if setup.compiled else 'no'}, seq {setup.seq}, micro {setup.micro} x {setup.n_micro} "
             f"micro-batches, parts {parts}" + (" (auto)" if not isinstance(cfg.model_topo.parts, list) else ""),
             f"  pipeline bubble (P-1)/(M+P-1) = {setup.bubble:.1%}"]
    if setup.lora is not None:
        train = sum(s.extra["trainable"] for s in stages)
        lines.append(f"  LoRA r {setup.lora.r}: {train / 1e6:.2f}M trainable parameters ({train / total:.2%}); the base "
                     f"is frozen {setup.dtype} weights{_quant_note(costs, setup)} (no grads, master or optimizer state); checkpoints ~"
                     f"{train * (4 + (4 if setup.optimizer == 'Lion' else 8)) / GiB:.2f} GiB")
    head = f"  {'stage':>5} {'layers':>6} {'blocks':>6} {'params':>8} {'weights':>8} {'grads':>7} {'optim':>7} " \
           f"{'activ':>7} {'peak GiB':>8} {'rel time':>8}"
    lines.append(head)
    slowest = max(s.time for s in stages)
    for s in stages:
        lines.append(f"  {s.stage:>5} {s.layers:>6} {s.blocks:>6} {s.params / 1e9:>7.2f}B {gib(s.weights):>8} "
                     f"{gib(s.grads):>7} {gib(s.optimizer):>7} {gib(s.activations):>7} {gib(s.peak):>8} "
                     f"{s.time / slowest:>8.2f}")
    for s in stages:
        if s.peak > gpu_mem_gib * GiB:
            lines.append(f"  WARNING: stage {s.stage} needs ~{gib(s.peak)} GiB > --gpu-mem-gib {gpu_mem_gib:g}: "
                         "use more stages, grad ckpt (selective/full), a smaller micro-batch or offload")
    if not any(s.peak > gpu_mem_gib * GiB for s in stages):
        lines.append(f"  fits: largest stage ~{gib(max(s.peak for s in stages))} GiB of {gpu_mem_gib:g} GiB")
    lines.append(f"  throughput estimate: ~{tokens_per_s_per_gpu(stages, setup):,.0f} tok/s/GPU on H100/H200 (llama "
                 f"stage MFU {LLAMA_STAGE_MFU:.2f} x {name} efficiency {family_efficiency(family):.2f}, "
                 f"engine/plan.py FAMILY_EFFICIENCY; slowest stage, bubble included)")
    if cfg.fp8 == "auto":
        fp8, why = fp8_auto(cfg, family.dims(args))
        lines.append(f"  fp8: auto -> {'tensorwise' if fp8 else 'off (bf16)'}: {why}"
                     + (" (on a GPU with FP8 tensor cores and torchao; else bf16)" if fp8 else ""))
    if setup.offload:
        lines.append(f"  offload_activations: ~{gib(max(s.extra['host'] for s in stages))} GiB of pinned CPU memory per GPU "
                     "(the largest stage's block inputs in flight)")
    if setup.seq >= LONG_CONTEXT_FROM or setup.offload or setup.head_chunk:
        lines += long_context_table(family, args, setup, parts, gpu_mem_gib)
    return "\n".join(lines), stages


# ---------------------------------------------------------------------- long context
LONG_CONTEXT_FROM = 32768  # the dry run adds the long-context table from this max_seq_len (or with a lever on)
LONG_SEQS = (32768, 65536, 131072, 262144)
TABLE_CHUNK = 4096  # the table's head chunk while head_chunk_tokens is off


def _mlp_act_bytes(d: Dims, s: Setup) -> float:
    """Per token, the MLP intermediates inside block_act_bytes' no-recompute set (what a tiled MLP,
    walking the tokens in tiles through the MLP, would keep only one tile of)."""
    k = max(d.top_k, 1)
    if s.compiled:
        return s.act_bytes * (2 * d.ffn if d.gated else d.ffn) * k
    return s.act_bytes * (4 * d.ffn if d.gated else 3 * d.ffn) * k


def long_context_table(family, args, setup: Setup, parts: list[int], gpu_mem_gib: float) -> list[str]:
    """Per-stage peaks at LONG_SEQS tokens per row without and with each memory lever (same parts,
    micro-batch and everything else as configured): offload_activations (implies full recompute)
    and head_chunk_tokens; plus what a tiled MLP would save, the lever not built."""
    import dataclasses

    chunk = setup.head_chunk or TABLE_CHUNK
    levers = (("none", dict(offload=False, head_chunk=0)),
              ("offload", dict(offload=True, ckpt="full", head_chunk=0)),
              ("chunk", dict(offload=False, head_chunk=chunk)),
              ("offload+chunk", dict(offload=True, ckpt="full", head_chunk=chunk)))
    lines = [f"  long context: estimated peak GiB per stage at micro {setup.micro}, parts {parts} ('!' = over "
             f"--gpu-mem-gib {gpu_mem_gib:g}); offload = offload_activations (with full recompute), chunk = "
             f"head_chunk_tokens {chunk}; host = pinned CPU GiB per GPU",
             f"  {'seq':>7} {'levers':<14} " + " ".join(f"{'stage ' + str(i):>8}" for i in range(len(parts)))
             + f" {'host':>6}"]
    for seq in LONG_SEQS:
        for name, kw in levers:
            s = dataclasses.replace(setup, seq=seq, **kw)
            stages = estimate(layer_costs(family, args, s), parts, s)
            cells = " ".join(f"{gib(e.peak) + ('!' if e.peak > gpu_mem_gib * GiB else ''):>8}" for e in stages)
            lines.append(f"  {seq:>7} {name:<14} {cells} {gib(max(e.extra['host'] for e in stages)):>6}")
    s = dataclasses.replace(setup, seq=LONG_SEQS[2], ckpt="full")
    mlp = _mlp_act_bytes(family.dims(args), s) * s.tokens
    full = block_act_bytes(family.dims(args), s, "none") * s.tokens
    lines.append(f"  tiled MLP (not built): at {LONG_SEQS[2]} tokens the recomputed block's MLP intermediates are "
                 f"{gib(mlp)} of its {gib(full)} GiB: the most a tiled MLP would take off a stage's peak")
    return lines


def _quant_note(costs: list[LayerCost], setup: Setup) -> str:
    """The LoRA line's words on a quantized base: how much of it is 4-bit, at how many bytes."""
    quant = sum(c.quant for c in costs)
    if not quant:
        return ""
    return f", {quant / 1e9:.2f}B of them (the block linears) in NF4 at " \
        f"{sum(c.quant_bytes for c in costs) / quant:.3f} B/param"


def tokens_per_s_per_gpu(stages: list[StageEstimate], setup: Setup) -> float:
    """Training tokens/s per GPU of a pipeline whose slowest stage sets the pace: each stage runs
    llama-equivalent FLOPs (stage `time`, per token) at llama's measured stage MFU; the bubble
    leaves M/(M+P-1) of the time busy; the P stages of a pipeline share its tokens."""

    pace = PEAK_FLOPS * LLAMA_STAGE_MFU / max(s.time for s in stages)  # tokens/s through the slowest stage
    return pace * (1.0 - setup.bubble) / setup.pp


def _zero_report(cfg, name, total, setup: Setup, rank: StageEstimate, costs, world_size, gpu_mem_gib, opt) -> str:
    """train_ds_zero.py: the same cost model, one row per rank (every rank holds the same shares).
    ZeRO-3 also holds, while a layer runs, its gathered full weights and the next layer's prefetch."""
    if setup.zero == 3:  # offloaded parameters too: they compute on the GPU
        rank.extra["gathered"] = 2 * max(c.params for c in costs) * setup.act_bytes
    lines = [f"dry run: {name}, {total / 1e9:.2f}B parameters, ZeRO-{setup.zero} over {world_size} data-parallel ranks "
             f"(no pipeline)",
             f"  {setup.dtype}, optimizer {opt}, parameters {'offloaded' if setup.offload_param else 'on GPU'}, grad "
             f"ckpt {setup.ckpt}, seq {setup.seq}, micro {setup.micro} x {setup.n_micro} accumulation steps",
             f"  per rank  {'params':>8} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'gathered':>8} "
             f"{'peak GiB':>8}",
             f"  {'':8} {rank.params / 1e9 / max(setup.dp if setup.zero == 3 else 1, 1):>7.2f}B {gib(rank.weights):>8} "
             f"{gib(rank.grads):>7} {gib(rank.optimizer):>7} {gib(rank.activations):>7} "
             f"{gib(rank.extra.get('gathered', 0.0)):>8} {gib(rank.peak):>8}"]
    if rank.peak > gpu_mem_gib * GiB:
        lines.append(f"  WARNING: a rank needs ~{gib(rank.peak)} GiB > --gpu-mem-gib {gpu_mem_gib:g}: use grad ckpt, a "
                     "smaller micro-batch, ZeRO-3, or offload")
    else:
        lines.append(f"  fits: ~{gib(rank.peak)} GiB per rank of {gpu_mem_gib:g} GiB")
    return "\n".join(lines)


FLEX_TILE = 128  # FlexAttention's BlockMask tile: the whole row a seq rank attends over is cut into these


def check_seq(cfg, family, args, gpu: bool) -> None:
    """The seq axis against the model (one ConfigError line): query heads divisible by seq, KV heads
    replicable to a count seq divides, max_seq_len a multiple of seq (x 128 where packed rows run
    FlexAttention: a GPU), and no dynamic NTK rope (its per-document length would be read from one
    rank's slice). The dry run checks as for a GPU; a launch for the machine it runs on."""
    from engine.config import ConfigError
    from models.sequence_parallel import check_divisible, kv_heads_ok

    n, where = cfg.seq_dim, cfg.source
    if n == 1:
        return
    d = family.dims(args)
    key = "model_topo.process_topology.dims"
    why = check_divisible("the model's attention heads", d.heads, n)
    if why is None and not kv_heads_ok(d.kv_heads, d.heads, n):
        why = f"the model's {d.kv_heads} key-value heads cannot be repeated to a count seq {n} divides"
    if why is None and cfg.packing and gpu:
        why = check_divisible("max_seq_len (packing: FlexAttention tiles)", cfg.max_seq_len, n, FLEX_TILE)
    if why is None and (getattr(args, "rope", None) or {}).get("rope_type") == "dynamic":
        why = "rope_type dynamic (per-document NTK scaling) is not supported with seq > 1"
    if why:
        raise ConfigError(f"{where}: {key}: {why}")


def check_dense_attention(cfg, family, args, gpu: bool) -> None:
    """Rows over models.masks.DENSE_MASK_MAX_SEQ on an attention path that builds an [S, S] tensor
    (SDPA / flash-attn with a window mask, packed rows on CPU, ALiBi outside FlexAttention) are one
    ConfigError line. The dry run judges as for a GPU with this machine's flash-attn; a launch for
    the machine it runs on."""
    from engine.config import ConfigError
    from models.attention import FLEX_MIN_HEAD_DIM, attn_impl
    from models.masks import DENSE_MASK_MAX_SEQ, dense_attention

    if cfg.max_seq_len <= DENSE_MASK_MAX_SEQ:
        return
    d = family.dims(args)
    impl = attn_impl(cfg.packing, cfg.use_flash_attn, gpu)
    if impl == "flex" and d.head_dim < FLEX_MIN_HEAD_DIM:  # models.attention.options_for_head_dim
        impl = "sdpa"
    why = dense_attention(impl, cfg.packing, d.window, d.positional == "alibi")
    if why:
        raise ConfigError(f"{cfg.source}: max_seq_len {cfg.max_seq_len} is over {DENSE_MASK_MAX_SEQ} and {why}; "
                          f"use packing: true on a GPU (FlexAttention) or a shorter max_seq_len")


def dry_run(cfg, world_size: int, gpu_mem_gib: float = 80.0, pipeline: bool = True) -> str:
    """Validate cfg against the world size and the model's config.json, and return the report."""
    from engine.config import validate
    from engine.model import Model

    model = Model.for_training(cfg)
    validate(cfg, world_size, model.n_layers, pipeline=pipeline)
    check_seq(cfg, model.family, model.args, gpu=True)
    check_dense_attention(cfg, model.family, model.args, gpu=True)
    text, _ = report(cfg, model.family, model.args, world_size, gpu_mem_gib, pipeline)
    return text
