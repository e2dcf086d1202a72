"""Training config: YAML -> nested dataclasses, DeepSpeed keys passed through.

One YAML file holds our keys (gdGPT-compatible names) and DeepSpeed's own top-level keys side
by side. Ours are parsed into `TrainConfig`; DeepSpeed's are kept verbatim in `TrainConfig.ds`
and handed to `deepspeed.initialize`. A key that is neither is an error naming it, with the
closest known key as a suggestion. All cross-field checks live in `validate`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.gdgpt_compat import map_gdgpt_keys


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the file and key."""


def doc(text: str, **kw):
    """A dataclass field with a one-line description (shown by `--help-config`)."""
    return field(metadata={"doc": text}, **kw)


# DeepSpeed's top-level config keys (passed through untouched; DeepSpeed validates values).
DEEPSPEED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger",
    "communication_data_type", "data_types", "pipeline", "checkpoint", "memory_breakdown",
    "disable_allgather", "dataloader_drop_last", "elasticity", "aio", "compile", "timers",
    "seq_parallel_communication_data_type", "graph_harvesting", "use_node_local_storage",
}
# Keys of ours inside DeepSpeed's sections (we read them; engine/training/optim.py) with their help text,
# {dotted key: (type, default, text)}: `--help-config` lists them beside the dataclass fields
OWNED_DS_KEYS = {
    "optimizer.no_wd_kws": ("list[str] | None", "None",
                            "gdGPT's key: regexes searched (re.search) in parameter names, which follow HF's inside a "
                            "layer (e.g. 'bias', '[a-zA-Z]*norm'); a parameter matching one gets no weight decay, every "
                            "other does; unset: 1-D parameters (norms, biases) get none"),
}
ALIASES = {"n_epoches": "n_epochs"}  # gdGPT's spelling
OPTIMIZERS = ("AdamW", "Adam", "Lion")
MAX_DATA_WEIGHT = 1000  # an epoch lists every sample `weight` times: more would only fill memory


@dataclass
class ProcessTopology:
    axes: list[str] = doc("process grid axes, outermost first: [pipe, data], or [pipe, data, seq] for sequence "
                          "parallelism (each row split over seq ranks, DeepSpeed Ulysses all-to-all around "
                          "attention)", default_factory=lambda: ["pipe", "data"])
    dims: list[int] | None = doc("size of each axis; product = number of GPUs (unset: every process one "
                                 "pipeline stage, [N, 1], for train_ds.py; [1, N] for train_ds_zero.py)", default=None)


@dataclass
class ModelTopo:
    process_topology: ProcessTopology = doc("pipeline x data-parallel grid", default_factory=ProcessTopology)
    parts: list[int] | str | None = doc(
        "pipeline layers per stage, one list entry per pipe rank: the embedding slot counts 1 (bloom's embedding "
        "norm is in it), each block 1, the final norm + head 1 (a tied head's twin too); auto (or null): the split "
        "engine/plan.py's cost model picks (slowest stage minimised within this GPU's memory); the ZeRO path has "
        "one stage, so a list there must be [all layers]", default="auto")


@dataclass
class LoraConfig:
    r: int = doc("LoRA rank: train low-rank adapters on the blocks' linears, base weights frozen in the run's "
                 "precision (no fp32 master, gradient or optimizer state); 0 = off (full fine-tuning)", default=0)
    alpha: float = doc("adapter scale numerator: each adapted linear adds alpha/r x B A x (PEFT's lora_alpha)",
                       default=16.0)
    dropout: float = doc("dropout on the adapters' input while training (PEFT's lora_dropout)", default=0.0)
    target_modules: list[str] | str = doc("HF module names to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                          "up_proj, down_proj; bloom/chatglm: query_key_value, dense, "
                                          "dense_h_to_4h, dense_4h_to_h; baichuan: W_pack), all-linear: every "
                                          "linear of the blocks, or a regex string matched against the whole HF "
                                          r"module name as PEFT does (e.g. '.*\.(q|v)_proj')", default="all-linear")
    modules_to_save: list[str] | None = doc("whole modules trained in full beside the adapters and saved with them, "
                                            "e.g. [embed_tokens, lm_head] for new tokens", default=None)
    use_rslora: bool = doc("rank-stabilised LoRA: scale the adapters by alpha/sqrt(r) instead of alpha/r (PEFT's "
                           "use_rslora)", default=False)
    use_dora: bool = doc("DoRA: a trained magnitude per output row of each adapted linear, over the row norm of "
                         "W + scale B A (PEFT's use_dora); not with ZeRO-3", default=False)
    init_lora_weights: bool | str = doc("fresh adapters as PEFT initialises them: true (A kaiming-uniform, B zero: "
                                        "starts as the base), gaussian (A normal, std 1/r, B zero), false (A and B "
                                        "random: does not start as the base)", default=True)
    layers_to_transform: list[int] | None = doc("adapt only these blocks (0-based, PEFT's layers_to_transform); "
                                                "null: every block", default=None)
    init_from: str | None = doc("start the adapters from a trained adapter instead of fresh ones: a PEFT adapter "
                                "dir (adapter_config.json + adapter_model.safetensors, as save_pretrained writes "
                                "it, or our --lora-adapter export) or a LoRA run's save_path; its r, alpha, targets "
                                "and options must equal these keys; a fresh optimizer, any pp x dp", default=None)
    base_quant: str = doc("QLoRA: none (the frozen base in the run's dtype) or nf4 (the frozen linears of the blocks "
                          "stored in 4 bits as torchao's NF4Tensor, dequantized one linear at a time in the forward; "
                          "embedding, norms, head and mixtral's experts stay in the run's dtype); needs lora.r > 0 and "
                          "torchao; not with fp8, use_dora or ZeRO-3", default="none")


@dataclass
class TrainConfig:
    model_path: str = doc("a local model dir: a pipeline checkpoint (`convert_model.py hg_to_pp`'s output or a run's "
                          "save_path), an HF dir or a gdGPT dir (not a hub id: hg_to_pp or download takes one); "
                          "with from_scratch only its config.json and tokenizer are read")
    data_path: list[str] = doc("training sample files (JSON array or JSONL); a string or a list")
    save_path: str = doc("where checkpoints, metrics and the resolved config go")
    max_seq_len: int = doc("tokens per training row", default=2048)
    n_epochs: int = doc("passes over the data (gdGPT's n_epoches accepted)", default=1)
    max_steps: int = doc("stop after this many global steps (0 = run all epochs)", default=0)
    seed: int = doc("seed for weights init, shuffling and dropout", default=42)
    use_grad_ckpt: bool | str = doc("activation recompute: false, true (= full blocks) or selective (keep matmul/"
                                    "attention outputs, recompute the elementwise ops)", default=False)
    use_flash_attn: bool = doc("flash-attn's kernel for unpacked rows on a GPU when importable (packed rows take "
                               "FlexAttention's document mask either way; SDPA otherwise)", default=False)
    compile_blocks: bool = doc("torch.compile each transformer block and the loss (GPU; fixed shapes)", default=False)
    fp8: str = doc("FP8 training of the transformer blocks' linears through torchao.float8: tensorwise (fastest), "
                   "rowwise (finer scales) or off; needs bf16, a GPU with FP8 tensor cores (H100/H200, "
                   "compute capability >= 8.9) and torchao; the pipeline path only; rowwise_with_gw_hp: rowwise with "
                   "the weight-gradient GEMM kept in bf16 (torchao's most accurate recipe); auto (default): "
                   "tensorwise only where fp8 was measured faster than bf16 for this hidden size and micro-batch "
                   "with compiled blocks (engine/plan.py FP8_SPEEDUP) and the GPU and torchao support it, else off "
                   "(bf16); the start and --dry-run say which and why", default="auto")
    fp8_head: bool = doc("with fp8 on: also train the head's projection (lm_head; an untied head whose dims are "
                         "multiples of 16) in FP8, same recipe; default false (torchao advises bf16 for the last "
                         "layer)", default=False)
    kernels: str = doc("elementwise kernels of the blocks and the loss: inductor (PyTorch's ops, fused by "
                       "torch.compile under compile_blocks) or liger (liger-kernel's Triton kernels for RMSNorm, "
                       "SwiGLU and llama-style rotary, and an untied llama-style head + cross-entropy fused without "
                       "logits when the loss is plain causal LM: no aux_max_z_loss, no MoE router loss); liger needs "
                       "a GPU, `pip install liger-kernel` and the pipeline path, and excludes compile_blocks and "
                       "fp8_head", default="inductor")
    wgrad_fusion: bool = doc("bf16 pipeline runs with fp32 gradient accumulation (fp8 off): the blocks' linears add "
                             "their weight gradients into the fp32 buffers inside the wgrad GEMM (+4.1% tok/s on an "
                             "H200); false: DeepSpeed's separate bf16 gradient + add", default=True)
    offload_activations: bool = doc("long context: with use_grad_ckpt: full, each block's input (what full recompute "
                                    "keeps, 1 GiB per block at 128k tokens on a 7B) is copied to pinned CPU memory on a "
                                    "side stream in the forward and back for the block's backward (models/offload.py)",
                                    default=False)
    head_chunk_tokens: int = doc("long context: the head's projection + cross-entropy walked in chunks of this many "
                                 "tokens, each recomputed in backward, so the [tokens, vocab] logits never exist in "
                                 "full (any family, tied heads, aux_max_z_loss; models/chunked_loss.py); 0 = off",
                                 default=0)
    from_scratch: bool = doc("random init (pretraining): model_path needs only config + tokenizer", default=False)
    packing: bool = doc("pack several samples per row (no attention across them)", default=False)
    skip_bad_samples: bool = doc("skip and count malformed samples instead of stopping", default=False)
    data_weights: list[float] | None = doc("sampling weight per data file (default: 1 each)", default=None)
    prompt_template: str = doc("auto: the tokenizer's chat template when it has one, else default; default: the "
                               "Alpaca / ### User / ### Assistant layouts (data/templates.py); chat_template: the "
                               "tokenizer's own (an error without one); gdgpt: gdGPT's own layout, piece by piece "
                               "(data/gdgpt_template.py)", default="auto")
    cache_dir: str | None = doc("tokenized-data cache (default: <save_path>/data_cache)", default=None)
    eval_data_path: list[str] | None = doc("held-out sample files for eval loss/perplexity (none: no eval)",
                                           default=None)
    evaluate_every: int = doc("evaluate every N global steps and after the last (0 = only after the last)",
                              default=0)
    eval_batches: int = doc("evaluate at most N global batches of the held-out set (0 = all of it)", default=0)
    save_every_steps: int = doc("checkpoint every N global steps (0 = only at the end)", default=0)
    save_at_end: bool = doc("write a checkpoint when training ends (benchmarks turn it off)", default=True)
    save_every_minutes: float = doc("also checkpoint when this much wall time passed since the last save "
                                    "(0 = off; rank 0's clock decides for all ranks)", default=0.0)
    keep_last: int = doc("keep the newest N checkpoint tags (0 = keep all); never deletes the one 'latest' names",
                         default=0)
    reshape_state: bool = doc("no effect (kept so older configs load): every checkpoint's optimizer state is "
                              "topology-free (<tag>/optim/) and resumes on any pp x dp layout or parts", default=True)
    on_nonfinite_loss: str = doc("stop: exit with an error (the bad update is not applied, the last checkpoint is "
                                 "kept); skip: drop that step's update and go on (logged as skipped)", default="stop")
    dist_timeout_s: float = doc("seconds a collective (or the start-up rendezvous) may wait for the other ranks "
                                "before the run ends with one line naming the rank, its stage and the operation "
                                "(exit 1); NCCL's default; tests set a few seconds", default=1800.0)
    profile_step: int = doc("record global step N under torch.profiler: top kernels + trace in <save_path>/profile/ "
                            "(0 = off)", default=0)
    resume: bool | str = doc("'auto': continue from save_path if it has a checkpoint; true: must; false: never",
                             default="auto")
    aux_max_z_loss: dict | None = doc("gdGPT's max-z loss: {weight: w} adds w x mean over positions of (max "
                                      "log-softmax of the LM logits)^2 to the loss, logged as z_loss", default=None)
    router_z_loss_coef: float = doc("MoE families: weight of ST-MoE's router z-loss, mean over real tokens of "
                                    "logsumexp(router logits)^2 averaged over MoE layers, logged as router_z_loss "
                                    "(0 = off)", default=0.0)
    model_topo: ModelTopo = doc("pipeline/data-parallel layout", default_factory=ModelTopo)
    lora: LoraConfig = doc("LoRA fine-tuning (lora.r > 0)", default_factory=LoraConfig)
    ds: dict = doc("DeepSpeed's own keys, passed through", default_factory=dict)
    source: str = doc("file the config was read from (set by the loader)", default="<dict>")

    # ------------------------------------------------------------------ derived views
    @property
    def pipe_dim(self) -> int:
        return self.model_topo.process_topology.dims[self.model_topo.process_topology.axes.index("pipe")]

    @property
    def data_dim(self) -> int:
        return self.model_topo.process_topology.dims[self.model_topo.process_topology.axes.index("data")]

    @property
    def seq_dim(self) -> int:
        """Sequence-parallel ranks per row (the `seq` axis; 1 without one)."""
        topo = self.model_topo.process_topology
        return topo.dims[topo.axes.index("seq")] if "seq" in topo.axes and topo.dims else 1

    @property
    def max_z_weight(self) -> float:
        return float((self.aux_max_z_loss or {}).get("weight", 0.0))

    @property
    def micro_batch(self) -> int:
        return int(self.ds["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.ds["gradient_accumulation_steps"])

    @property
    def dtype(self) -> str:
        if self.ds.get("bf16", {}).get("enabled"):
            return "bf16"
        if self.ds.get("fp16", {}).get("enabled"):
            return "fp16"
        return "fp32"

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs: bf16 and fp16 run at least ZeRO-1 (bf16: deepspeed_setup.deepspeed_config
        says why; both: checkpoints read fp32 masters through ZeRO's fragment API, which stage 0's
        FP16_Optimizer lacks; ZeRO-1 keeps its memory layout)."""
        stage = int(self.ds.get("zero_optimization", {}).get("stage", 0))
        return max(stage, 1) if self.dtype in ("bf16", "fp16") else stage

    @property
    def bf16_grad_accum(self) -> str | None:
        """bf16 pipeline runs: the dtype gradients add up in over micro-batches. fp32 unless
        `data_types.grad_accum_dtype` says otherwise (DeepSpeed's own default for bf16 + ZeRO-1 adds
        them up in bf16, rounding every micro-batch's gradient into the sum). None: not bf16, or
        optimizer offload (DeepSpeed's CPU path decides)."""
        offload = self.ds.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
        if self.dtype != "bf16" or offload.get("device", "none") != "none":
            return None
        return self.ds.get("data_types", {}).get("grad_accum_dtype", "fp32")


# ---------------------------------------------------------------------- parsing
def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


INT64_MAX = 2**63 - 1  # what torch and numpy hold (seeds, counts, sizes)
FP8_VALUES = ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp", "auto")  # auto: resolved per machine
PATH_KEYS = ("model_path", "data_path", "save_path", "cache_dir", "eval_data_path")


def _show(value) -> str:
    """repr(value), bounded: a YAML alias bomb expands to a structure whose full repr never ends."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls, raw: dict, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"ds", "source"}
    kwargs = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key) if not prefix else key
        if name not in names:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'"
                              f"{_suggest(key, names | (DEEPSPEED_KEYS if not prefix else set()))}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is not None:  # `model_topo:` left empty: its defaults
                kwargs[name] = _build(tp, value, where, f"{prefix}{name}.")
            continue
        if name in ("data_path", "eval_data_path") and isinstance(value, str):
            value = [value]
        if tp in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name == "fp8" and value is False:  # YAML 1.1 reads a bare `off` (or `no`) as false
            value = "off"
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}: '{prefix}{key}' must be {_type_name(tp)}, got {_show(value)}")
        if any(isinstance(v, int) and abs(v) > INT64_MAX for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{where}: '{prefix}{key}' is out of range (at most {INT64_MAX}), got {_show(value)}")
        if name in PATH_KEYS and value is not None:  # `~/runs/x` is the user's home, not a dir named '~' here
            value = [os.path.expanduser(v) for v in value] if isinstance(value, list) else os.path.expanduser(value)
        kwargs[name] = value
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name in names and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key '{prefix}{missing[0]}'")
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; users mean a float."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _mapping_without_duplicates(loader, node, deep=False):
    """PyYAML keeps the last of two equal keys silently; a config that says a key twice is a mistake."""
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
            seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (first on line {first})",
                                                    key_node.start_mark)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor("tag:yaml.org,2002:map", _mapping_without_duplicates)


def parse_value(text: str):
    """A CLI override value, read as YAML (so 1e-4, true, [1, 2] work)."""
    return yaml.load(text, Loader=_Loader) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a raw config dict (before validation)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        path, text = item.split("=", 1)
        node = raw
        *parents, leaf = keys = [k.strip() for k in path.split(".")]
        if not all(keys):
            raise ConfigError(f"--set {item!r}: empty key name in {path.strip()!r} (expected e.g. optimizer.params.lr=1e-5)")
        for p in parents:
            if node.get(p) is None:  # absent, or a section left empty in the file
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a mapping")
        try:
            node[leaf] = parse_value(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: not a YAML value ({getattr(e, 'problem', None) or e})") from None
    return raw


def from_dict(raw: dict, where: str = "<dict>") -> TrainConfig:
    raw = copy.deepcopy(dict(raw or {}))
    notes = map_gdgpt_keys(raw)
    ds = {k: raw.pop(k) for k in list(raw) if k in DEEPSPEED_KEYS}
    ds = {k: v for k, v in ds.items() if v is not None}  # `zero_optimization:` left empty: DeepSpeed's default
    cfg = _build(TrainConfig, raw, where)
    cfg.ds, cfg.source = ds, where
    _check_ds_sections(ds, where)
    cfg.notes = [f"{where}: {n}" for n in notes]  # one line each, shown by the entry scripts (rank 0)
    _resolve_batch(cfg)
    resolve_lr(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    from data.reader import bom_encoding

    encoding = bom_encoding(data) or "utf-8"  # a BOM (Windows editors, PowerShell's UTF-16) says which
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: byte 0x{e.object[e.start]:02x} is not {encoding.upper()} "
                          f"({e.reason}); save the file as UTF-8") from None
    raw = _parse_json(text, path) if text.lstrip("\ufeff \t\r\n").startswith("{") else None
    try:
        raw = raw if raw is not None else (yaml.load(text, Loader=_Loader) or {})
    except yaml.reader.ReaderError as e:  # a character YAML never allows (NUL, other C0 controls)
        line, char = text.count("\n", 0, e.position) + 1, e.character
        char = chr(char) if isinstance(char, int) else char
        raise ConfigError(f"{path}: line {line}: character {char!r} is not allowed in YAML (a binary or "
                          "UTF-16 file?)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = " (YAML allows no tabs there: use spaces)" if "'\\t'" in problem else ""
        raise ConfigError(f"{path}:{at} not valid YAML: {problem}{hint}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return from_dict(apply_overrides(raw, overrides or []), str(path))


def _parse_json(text: str, path: Path) -> dict | None:
    """A config written as JSON (gdGPT's early configs, other tools' output): read as JSON, which YAML
    is not quite a superset of (tab indentation is fine in JSON). None: not JSON, YAML reads it."""
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError(f"{path}: key {key!r} given twice")
            seen[key] = value
        return seen

    try:
        return json.loads(text.lstrip("\ufeff"), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, RecursionError):
        return None


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as one flat YAML-able dict (DeepSpeed keys back at top level)."""
    out = dataclasses.asdict(cfg)
    out.pop("source")
    out.update(out.pop("ds"))
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------- cross-field checks
def _resolve_batch(cfg: TrainConfig) -> None:
    """Fill in micro batch / grad accumulation from whichever DeepSpeed batch keys were given."""
    ds, where = cfg.ds, cfg.source
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds and (not isinstance(ds[key], int) or isinstance(ds[key], bool) or not 1 <= ds[key] <= INT64_MAX):
            raise ConfigError(f"{where}: '{key}' must be a positive integer (at most {INT64_MAX}), got {_show(ds[key])}")
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    if "gradient_accumulation_steps" not in ds and "train_batch_size" not in ds:
        ds["gradient_accumulation_steps"] = 1


DEFAULT_LR = 1e-5
# DeepSpeed schedulers that set the peak lr themselves (others take the optimizer's lr as the peak)
SCHEDULER_PEAK = {"WarmupLR": "warmup_max_lr", "WarmupDecayLR": "warmup_max_lr", "OneCycle": "cycle_max_lr"}
SCHEDULER_TOTAL = ("WarmupDecayLR", "WarmupCosineLR")  # need total_num_steps: filled from the run's step count


def _unset(value) -> bool:
    """gdGPT's early configs wrote -1 for 'computed by the script'."""
    return value is None or value == "auto" or isinstance(value, (int, float)) and value < 0


def resolve_lr(cfg: TrainConfig) -> None:
    """One peak lr: `optimizer.params.lr` (default 1e-5). A scheduler that sets its own peak
    (warmup_max_lr, cycle_max_lr) takes it from there unless given; given both with different
    values is an error naming both keys. warmup_min_lr defaults to 0; total_num_steps, when
    unset, is filled at launch with the run's step count (engine.training.deepspeed_setup)."""
    where, ds = cfg.source, cfg.ds
    for key in ("optimizer", "scheduler"):
        if key in ds and ds[key] is None:  # `scheduler:` left empty: none
            del ds[key]
    opt = ds.setdefault("optimizer", {"type": "AdamW"})
    sched = ds.get("scheduler")
    for key, block in (("optimizer", opt), ("scheduler", sched)):
        if block is not None and (not isinstance(block, dict) or not isinstance(block.get("params") or {}, dict)):
            raise ConfigError(f"{where}: '{key}' must be a mapping with 'type' and a 'params' mapping")
    opt.setdefault("type", "AdamW")  # `optimizer: {params: ...}`: the default optimizer's params
    params = opt["params"] = opt.get("params") or {}
    lr = params.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
        raise ConfigError(f"{where}: optimizer.params.lr must be a positive number, got {lr!r}")
    if sched is None:
        params.setdefault("lr", DEFAULT_LR)
        return
    kind = sched.get("type")
    sp = sched["params"] = sched.get("params") or {}
    for key, value in sp.items():
        if key.endswith("_lr") and _is_number(value) and not abs(value) < math.inf:
            raise ConfigError(f"{where}: scheduler.params.{key} must be a finite number, got {value}")
    peak_key = SCHEDULER_PEAK.get(kind)
    if peak_key:
        peak = None if _unset(sp.get(peak_key)) else sp[peak_key]
        if peak is not None and not (_finite(peak) and peak > 0):
            raise ConfigError(f"{where}: scheduler.params.{peak_key} must be a positive number (or left out: "
                              f"optimizer.params.lr is the peak), got {_show(peak)}")
        if lr is not None and peak is not None and not math.isclose(lr, peak, rel_tol=1e-9):
            raise ConfigError(f"{where}: optimizer.params.lr {lr:g} and scheduler.params.{peak_key} {peak:g} disagree "
                              f"(the optimizer's lr is the peak the scheduler reaches): drop scheduler.params.{peak_key} "
                              "or give both the same value")
        params["lr"] = lr = lr if lr is not None else peak if peak is not None else DEFAULT_LR
        sp[peak_key] = lr
    else:
        params.setdefault("lr", DEFAULT_LR)
    if kind in ("WarmupLR", "WarmupDecayLR"):
        sp.setdefault("warmup_min_lr", 0.0)
    if kind in SCHEDULER_TOTAL:
        total = sp.get("total_num_steps")
        if _unset(total):
            sp.pop("total_num_steps", None)  # the run's step count, at launch
        elif not isinstance(total, int) or isinstance(total, bool):
            raise ConfigError(f"{where}: scheduler.params.total_num_steps must be a positive integer (or left out: "
                              f"the run's step count), got {_show(total)}")
        elif cfg.max_steps and total != cfg.max_steps:
            raise ConfigError(f"{where}: max_steps {cfg.max_steps} and scheduler.params.total_num_steps {total} "
                              "disagree: drop total_num_steps (it defaults to the run's step count) or give both "
                              "the same value")


def check_paths(cfg: TrainConfig) -> None:
    """The inputs a run reads exist and the dirs it writes can be (before anything is built or allocated)."""
    where = cfg.source
    for key in ("model_path", "save_path"):
        if not getattr(cfg, key).strip():
            raise ConfigError(f"{where}: '{key}' is empty")
    if not Path(cfg.model_path).is_dir():
        raise ConfigError(f"{where}: model_path {cfg.model_path}: no such directory")
    for key in ("data_path", "eval_data_path"):
        for i, p in enumerate(getattr(cfg, key) or []):
            if not Path(p).is_file():
                raise ConfigError(f"{where}: {key}[{i}] {p}: {_not_a_file(p)}")
    for key in ("save_path", "cache_dir"):
        blocked = _file_in_the_way(getattr(cfg, key))
        if blocked:
            raise ConfigError(f"{where}: {key} {getattr(cfg, key)}: {blocked} is a file, not a directory")
    if Path(cfg.save_path).resolve() == Path(cfg.model_path).resolve() and not _is_training_save(cfg.save_path):
        # a run resumes from its save_path: a model dir there would be taken for a broken checkpoint
        raise ConfigError(f"{where}: save_path {cfg.save_path} is model_path, a model dir (not a training save "
                          "dir): set save_path to a new directory")


def _is_training_save(path: str) -> bool:
    """A save_path an earlier run wrote: `latest` names a tag with our meta.json."""
    latest = Path(path) / "latest"
    tag = latest.read_text(errors="replace").strip() if latest.is_file() else ""
    return bool(tag) and "/" not in tag and (Path(path) / tag / "meta.json").is_file()


def _not_a_file(path: str) -> str:
    """Why a data path that is not a readable regular file is not one."""
    if os.path.isdir(path):
        return "is a directory, not a sample file (list its files)"
    if os.path.lexists(path) and not os.path.exists(path):
        return "is a broken symbolic link (its target is missing, or links loop)"
    if os.path.exists(path):
        return "is not a regular file"
    if any(c in path for c in "*?["):
        return "no such file (wildcards are not expanded: list the files)"
    return "no such file"


def _file_in_the_way(path: str | None) -> Path | None:
    """The path itself or an ancestor that exists as a non-directory (so the dir cannot be made)."""
    if not path:
        return None
    p = Path(path).absolute()
    return next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)


def validate(cfg: TrainConfig, world_size: int, n_layers: int, pipeline: bool = True) -> None:
    """Every cross-field rule, checked before anything is allocated.

    n_layers counts pipeline layers as `parts` does (embedding + blocks + head).
    """
    where = cfg.source
    topo = cfg.model_topo.process_topology
    if topo.dims is None:  # gdGPT's ZeRO configs have no model_topo
        topo.dims = [world_size, 1] if pipeline else [1, world_size]
        if topo.axes and topo.axes[0] == "data":
            topo.dims.reverse()
    if sorted(topo.axes) != ["data", "pipe"] and topo.axes != ["pipe", "data", "seq"]:
        raise ConfigError(f"{where}: model_topo.process_topology.axes must be [pipe, data] (or [pipe, data, seq] "
                          f"for sequence parallelism), got {topo.axes}")
    if len(topo.dims) != len(topo.axes) or any(d < 1 for d in topo.dims):
        raise ConfigError(f"{where}: model_topo.process_topology.dims must be {len(topo.axes)} positive sizes "
                          f"(one per axis of {topo.axes}), got {topo.dims}")
    if not pipeline and cfg.pipe_dim != 1:
        raise ConfigError(f"{where}: the ZeRO path has no pipeline: set model_topo.process_topology.dims to "
                          f"[1, {world_size // cfg.seq_dim}{', ' + str(cfg.seq_dim) if cfg.seq_dim > 1 else ''}]")
    if math.prod(topo.dims) != world_size:
        raise ConfigError(f"{where}: model_topo.process_topology.dims {topo.dims} needs "
                          f"{math.prod(topo.dims)} processes but {world_size} were launched")
    _check_seq(cfg)
    parts = cfg.model_topo.parts
    if isinstance(parts, str) and parts != "auto":
        raise ConfigError(f"{where}: model_topo.parts must be a list of layer counts or 'auto', got {_show(parts)}")
    if isinstance(parts, list):
        if len(parts) != cfg.pipe_dim:
            raise ConfigError(f"{where}: model_topo.parts has {len(parts)} stages but dims give pipe={cfg.pipe_dim}")
        if any(p < 1 for p in parts):
            raise ConfigError(f"{where}: model_topo.parts {parts}: every stage needs at least one layer")
        if sum(parts) != n_layers:
            raise ConfigError(f"{where}: model_topo.parts {parts} sums to {sum(parts)} but the model has {n_layers} "
                              f"pipeline layers (embedding + {n_layers - 2} blocks + head)")
    elif n_layers < cfg.pipe_dim:
        raise ConfigError(f"{where}: {n_layers} pipeline layers cannot fill {cfg.pipe_dim} stages")

    # seq ranks are data-parallel ranks to DeepSpeed (each holds 1/seq of every row): the batch triple counts them
    ds, dp = cfg.ds, cfg.data_dim * cfg.seq_dim
    micro = ds["train_micro_batch_size_per_gpu"]
    if "gradient_accumulation_steps" not in ds:
        if ds["train_batch_size"] % (micro * dp):
            raise ConfigError(f"{where}: train_batch_size {ds['train_batch_size']} is not a multiple of "
                              f"train_micro_batch_size_per_gpu {micro} x data-parallel size {dp}"
                              + (f" (data {cfg.data_dim} x seq {cfg.seq_dim})" if cfg.seq_dim > 1 else ""))
        ds["gradient_accumulation_steps"] = ds["train_batch_size"] // (micro * dp)
    expected = micro * ds["gradient_accumulation_steps"] * dp
    if ds.setdefault("train_batch_size", expected) != expected:
        raise ConfigError(f"{where}: train_batch_size {ds['train_batch_size']} != train_micro_batch_size_per_gpu "
                          f"{micro} x gradient_accumulation_steps {ds['gradient_accumulation_steps']} x "
                          f"data-parallel size {dp}" + (f" (data {cfg.data_dim} x seq {cfg.seq_dim})" if cfg.seq_dim > 1
                                                        else "") + f" = {expected}")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{where}: bf16 and fp16 are both enabled; pick one")
    opt = ds.get("optimizer", {"type": "AdamW"})
    if opt.get("type") not in OPTIMIZERS:
        raise ConfigError(f"{where}: optimizer.type {opt.get('type')!r} is not supported "
                          f"(one of {', '.join(OPTIMIZERS)}){_suggest(str(opt.get('type')), OPTIMIZERS)}")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {_show(stage)}")
    if pipeline and stage > 1:
        raise ConfigError(f"{where}: zero_optimization.stage {stage} does not work with pipeline parallelism "
                          "(DeepSpeed allows 0 or 1); use train_ds_zero.py for ZeRO-2/3")
    if not pipeline and stage == 0:
        raise ConfigError(f"{where}: train_ds_zero.py needs zero_optimization.stage 1, 2 or 3 (plain data "
                          f"parallelism is train_ds.py with dims [1, {world_size}])")
    for key, min_stage in (("offload_optimizer", 1), ("offload_param", 3)):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{where}: zero_optimization.{key}.device must be none, cpu or nvme, got {_show(device)}")
        if device != "none" and stage < min_stage:
            raise ConfigError(f"{where}: zero_optimization.{key} needs zero_optimization.stage >= {min_stage}, "
                              f"got {stage}")
    for key in ("max_seq_len", "n_epochs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{where}: '{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.data_weights is not None and len(cfg.data_weights) != len(cfg.data_path):
        raise ConfigError(f"{where}: data_weights has {len(cfg.data_weights)} entries for "
                          f"{len(cfg.data_path)} data_path files")
    if isinstance(cfg.use_grad_ckpt, str) and cfg.use_grad_ckpt not in ("none", "full", "selective"):
        raise ConfigError(f"{where}: use_grad_ckpt must be true, false, full or selective, got {cfg.use_grad_ckpt!r}")
    for key in ("save_every_steps", "save_every_minutes", "keep_last", "max_steps", "profile_step"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where}: '{key}' must be >= 0, got {getattr(cfg, key)}")
    if cfg.fp8 not in FP8_VALUES:
        raise ConfigError(f"{where}: fp8 must be one of {', '.join(FP8_VALUES)}, got {cfg.fp8!r}")
    if cfg.fp8 not in ("off", "auto") and not pipeline:
        raise ConfigError(f"{where}: fp8: {cfg.fp8} is supported on the pipeline path (train_ds.py) only; set fp8: off")
    if cfg.fp8_head and cfg.fp8 == "off":
        raise ConfigError(f"{where}: fp8_head: true needs fp8 on (tensorwise, rowwise, rowwise_with_gw_hp or auto)")
    if cfg.kernels not in ("inductor", "liger"):
        raise ConfigError(f"{where}: kernels must be inductor or liger, got {_show(cfg.kernels)}")
    if cfg.kernels == "liger" and not pipeline:
        raise ConfigError(f"{where}: kernels: liger is supported on the pipeline path (train_ds.py) only; "
                          f"set kernels: inductor")
    if cfg.kernels == "liger" and cfg.compile_blocks:  # measured: one H100, torch 2.11, liger-kernel 0.8.5
        raise ConfigError(f"{where}: kernels: liger with compile_blocks: true fails to compile (torch 2.11 cannot trace "
                          f"liger's SwiGLU Triton kernel inside a compiled block); set compile_blocks: false to run "
                          f"liger's kernels eagerly, or kernels: inductor")
    if cfg.kernels == "liger" and cfg.fp8_head:
        raise ConfigError(f"{where}: fp8_head and kernels: liger both claim the head projection (liger fuses it "
                          f"with the cross-entropy in bf16); pick one")
    _check_long_context(cfg)
    if cfg.fp8 not in ("off", "auto") and cfg.dtype != "bf16":
        raise ConfigError(f"{where}: fp8: {cfg.fp8} needs bf16: {{enabled: true}} (its parameters and "
                          f"gradients stay bf16), got {cfg.dtype}")
    if cfg.on_nonfinite_loss not in ("stop", "skip"):
        raise ConfigError(f"{where}: on_nonfinite_loss must be stop or skip, got {cfg.on_nonfinite_loss!r}")
    if isinstance(cfg.resume, str) and cfg.resume != "auto":
        raise ConfigError(f"{where}: resume must be auto, true or false, got {cfg.resume!r}")
    _check_gdgpt_keys(cfg)
    _check_values(cfg)


def _check_seq(cfg: TrainConfig) -> None:
    """The seq axis against the keys that do not compose with it (the model's own checks, heads and
    positions, are engine.plan.check_seq's)."""
    n, where = cfg.seq_dim, cfg.source
    if n == 1:
        return
    if cfg.max_seq_len % n:
        raise ConfigError(f"{where}: max_seq_len {cfg.max_seq_len} is not divisible by the seq axis "
                          f"(model_topo.process_topology.dims: seq {n}): each seq rank holds max_seq_len / seq tokens")


def _check_long_context(cfg: TrainConfig) -> None:
    """offload_activations and head_chunk_tokens against the keys they need or exclude."""
    where = cfg.source
    if cfg.offload_activations and cfg.use_grad_ckpt not in (True, "full"):
        raise ConfigError(f"{where}: offload_activations: true offloads the block inputs that full recompute keeps; "
                          f"set use_grad_ckpt: true (full), got {_show(cfg.use_grad_ckpt)}")
    if cfg.head_chunk_tokens < 0:
        raise ConfigError(f"{where}: 'head_chunk_tokens' must be >= 0 (0 = off), got {cfg.head_chunk_tokens}")
    if cfg.head_chunk_tokens and cfg.kernels == "liger":
        raise ConfigError(f"{where}: head_chunk_tokens and kernels: liger both claim the head (liger's fused linear "
                          f"cross-entropy already walks the vocabulary in chunks); pick one")
    if cfg.head_chunk_tokens and cfg.fp8_head:
        raise ConfigError(f"{where}: head_chunk_tokens projects with the head's bf16 weight, fp8_head would be "
                          f"ignored; pick one")


def _check_gdgpt_keys(cfg: TrainConfig) -> None:
    """aux_max_z_loss and optimizer.no_wd_kws, the two training keys gdGPT added."""
    where, z = cfg.source, cfg.aux_max_z_loss
    if z is not None:
        extra = sorted(set(z) - {"weight"})
        if extra:
            raise ConfigError(f"{where}: unknown key 'aux_max_z_loss.{extra[0]}' (it takes only 'weight')")
        w = z.get("weight")
        if not _finite(w):
            raise ConfigError(f"{where}: aux_max_z_loss.weight must be a finite number >= 0, got {_show(w)}")
    kws = (cfg.ds.get("optimizer") or {}).get("no_wd_kws")
    if kws is None:
        return
    if not isinstance(kws, list) or not all(isinstance(k, str) for k in kws):
        raise ConfigError(f"{where}: optimizer.no_wd_kws must be a list of strings (regular expressions), got {_show(kws)}")
    for k in kws:
        try:
            re.compile(k)
        except re.error as e:
            raise ConfigError(f"{where}: optimizer.no_wd_kws: {k!r} is not a regular expression ({e})") from None


# ---------------------------------------------------------------------- value checks
# DeepSpeed sections we or DeepSpeed read as mappings (`bf16: true` would fail deep inside either)
DS_MAPPINGS = ("optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast", "zero_optimization",
               "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger",
               "data_types", "pipeline", "checkpoint", "elasticity", "aio", "compile", "timers")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value, low: float = 0.0) -> bool:
    """A number in [low, inf): YAML's .inf / .nan and 1e400 (= inf) are no learning rate, decay or clip."""
    return _is_number(value) and low <= value < math.inf


def _check_ds_sections(ds: dict, where: str) -> None:
    """The shapes of the DeepSpeed keys we read ourselves (values are DeepSpeed's to check, in validate)."""
    for key in DS_MAPPINGS:
        if key in ds and ds[key] is not None and not isinstance(ds[key], dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping (e.g. {key}: {{...}}), got {_show(ds[key])}")
    for key in ("bf16", "fp16"):
        enabled = (ds.get(key) or {}).get("enabled", False)
        if not isinstance(enabled, bool) and enabled != "auto":
            raise ConfigError(f"{where}: '{key}.enabled' must be true or false, got {_show(enabled)}")
    zero = ds.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) is not None and not isinstance(zero[key], dict):
            raise ConfigError(f"{where}: 'zero_optimization.{key}' must be a mapping (e.g. {{device: cpu}}), "
                              f"got {_show(zero[key])}")
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(f"{where}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {_show(stage)}")
    clip = ds.get("gradient_clipping", 0.0)
    if not _finite(clip):
        raise ConfigError(f"{where}: 'gradient_clipping' must be a finite number >= 0 (0 = off), got {_show(clip)}")
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype", "fp32")
    if accum not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"{where}: 'data_types.grad_accum_dtype' must be fp32, fp16 or bf16, got {_show(accum)}")
    for key, known in (("optimizer", ("type", "params", "no_wd_kws")), ("scheduler", ("type", "params"))):
        extra = [k for k in ds.get(key) or {} if k not in known]  # DeepSpeed reads only these: a typo is lost
        if extra:
            raise ConfigError(f"{where}: unknown key '{key}.{extra[0]}'{_suggest(extra[0], known)} ({key} takes "
                              f"{', '.join(known)})")
        kind = (ds.get(key) or {}).get("type")
        if kind is not None and not isinstance(kind, str):
            raise ConfigError(f"{where}: '{key}.type' must be a name, got {_show(kind)}")
    opt = ds.get("optimizer") or {}
    if isinstance(opt.get("type"), str):  # DeepSpeed matches optimizer names case-insensitively
        opt["type"] = next((o for o in OPTIMIZERS if o.lower() == opt["type"].lower()), opt["type"])
    for key, value in (opt.get("params") or {}).items() if isinstance(opt.get("params"), dict) else ():
        if key == "betas":
            ok = isinstance(value, list) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1 for b in value)
            if not ok:
                raise ConfigError(f"{where}: 'optimizer.params.betas' must be two numbers in [0, 1), got {_show(value)}")
        elif key in ("lr", "eps", "weight_decay") and not _finite(value):
            raise ConfigError(f"{where}: 'optimizer.params.{key}' must be a finite number >= 0, got {_show(value)}")


def check_dist_timeout(cfg: TrainConfig) -> None:
    """dist_timeout_s, also checked before the process group it bounds starts (engine/cli.py)."""
    if not 0 < cfg.dist_timeout_s < math.inf:
        raise ConfigError(f"{cfg.source}: 'dist_timeout_s' must be a finite number > 0, got {cfg.dist_timeout_s}")


def _check_values(cfg: TrainConfig) -> None:
    """Values no cross-field rule covers: each key against what it may hold."""
    from data.templates import TEMPLATES

    where = cfg.source
    if not cfg.data_path:
        raise ConfigError(f"{where}: 'data_path' is empty: give at least one sample file")
    for key in ("data_path", "eval_data_path"):
        for i, p in enumerate(getattr(cfg, key) or []):
            if not p.strip():
                raise ConfigError(f"{where}: '{key}[{i}]' is empty")
    if cfg.prompt_template not in TEMPLATES:
        raise ConfigError(f"{where}: prompt_template must be one of {', '.join(TEMPLATES)}, got "
                          f"{cfg.prompt_template!r}{_suggest(cfg.prompt_template, TEMPLATES)}")
    weights = cfg.data_weights or []
    for i, w in enumerate(weights):
        if not (0 <= w < math.inf):
            raise ConfigError(f"{where}: 'data_weights[{i}]' must be a finite number >= 0, got {w!r}")
    if weights and not any(weights):
        raise ConfigError(f"{where}: 'data_weights' are all 0: no file would be read")
    for key in ("seed", "evaluate_every", "eval_batches"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where}: '{key}' must be >= 0, got {getattr(cfg, key)}")
    check_dist_timeout(cfg)
    if not 0 <= cfg.save_every_minutes < math.inf:
        raise ConfigError(f"{where}: 'save_every_minutes' must be a finite number >= 0 (0 = off), got "
                          f"{cfg.save_every_minutes}")
    for i, w in enumerate(weights):
        if w > MAX_DATA_WEIGHT:
            raise ConfigError(f"{where}: 'data_weights[{i}]' {w:g} is over {MAX_DATA_WEIGHT} (each sample of the file "
                              "that many times per epoch; n_epochs repeats the whole mix)")
    if not 0 <= cfg.router_z_loss_coef < math.inf:
        raise ConfigError(f"{where}: 'router_z_loss_coef' must be a finite number >= 0, got {cfg.router_z_loss_coef}")
    _check_lora(cfg)


def _check_lora(cfg: TrainConfig) -> None:
    where, lora = cfg.source, cfg.lora
    if lora.r < 0:
        raise ConfigError(f"{where}: lora.r must be >= 0 (0 = off), got {lora.r}")
    if not 0 < lora.alpha < math.inf:  # checked with r 0 too: a bad value is an error wherever it stands
        raise ConfigError(f"{where}: lora.alpha must be a finite number > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"{where}: lora.dropout must be in [0, 1), got {lora.dropout}")
    _check_base_quant(cfg)
    if not lora.r:
        return
    targets = lora.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        if _suggest(targets, ["all-linear"]):  # all_linear, all-linears: meant all-linear, not a regex
            raise ConfigError(f"{where}: lora.target_modules must be a list of module names, all-linear or a regex, "
                              f"got {targets!r}{_suggest(targets, ['all-linear'])}")
        try:
            re.compile(targets)
        except re.error as e:
            raise ConfigError(f"{where}: lora.target_modules: {targets!r} is not a regex ({e})") from None
        if lora.layers_to_transform is not None:  # PEFT ignores layers_to_transform beside a regex
            raise ConfigError(f"{where}: lora.layers_to_transform does not apply to a regex lora.target_modules "
                              "(PEFT ignores it there); select the blocks in the regex, or list the module names")
    if lora.init_lora_weights not in (True, False, "gaussian"):
        raise ConfigError(f"{where}: lora.init_lora_weights must be true, false or gaussian, got "
                          f"{lora.init_lora_weights!r} (PEFT's other initialisations are not implemented)")
    if lora.layers_to_transform is not None and (not lora.layers_to_transform or min(lora.layers_to_transform) < 0):
        raise ConfigError(f"{where}: lora.layers_to_transform must list block indices >= 0, got "
                          f"{lora.layers_to_transform}")
    if lora.use_dora and cfg.zero_stage == 3:
        raise ConfigError(f"{where}: lora.use_dora needs each adapted weight whole in the forward; ZeRO-3 partitions "
                          "it: use ZeRO-1/2 or the pipeline")
    if lora.use_dora and getattr(lora, "base_quant", None) not in (None, "none"):
        raise ConfigError(f"{where}: lora.use_dora with lora.base_quant: DoRA's row norms need the base weight "
                          "unquantized; use one of them")
    if isinstance(targets, list) and (not targets or not all(t.strip() for t in targets)):
        raise ConfigError(f"{where}: lora.target_modules must name at least one module (or all-linear), got {targets}")
    if any(not m.strip() for m in lora.modules_to_save or []):
        raise ConfigError(f"{where}: lora.modules_to_save has an empty name")


def _check_base_quant(cfg: TrainConfig) -> None:
    """lora.base_quant (models/quant.py): a known value, and nf4 only where it can run."""
    where, quant = cfg.source, cfg.lora.base_quant
    if quant not in ("none", "nf4"):
        raise ConfigError(f"{where}: lora.base_quant must be none or nf4, got {quant!r}{_suggest(str(quant), ['nf4'])}")
    if quant == "none":
        return
    if not cfg.lora.r:
        raise ConfigError(f"{where}: lora.base_quant: {quant} quantizes the frozen base of a LoRA run; set lora.r > 0")
    if cfg.fp8 not in ("off", "auto"):  # fp8's Float8Linear casts a bf16 weight; a 4-bit one has none to cast
        raise ConfigError(f"{where}: lora.base_quant: {quant} with fp8: {cfg.fp8}: the 4-bit base weights cannot "
                          "take FP8 training's weight casts; set fp8: off")
    if cfg.zero_stage == 3:  # ZeRO-3 partitions parameters; the 4-bit weights are none (models/quant.py)
        raise ConfigError(f"{where}: lora.base_quant: {quant} with ZeRO-3: the 4-bit base is not partitioned; use "
                          "ZeRO-1/2 (it is 0.52 B/param already) or the pipeline")


def owned_fields(cls=None, prefix: str = "") -> list[tuple[str, object, dataclasses.Field]]:
    """(dotted key, type, field) of every config key we own, nested sections walked."""
    hints, out = typing.get_type_hints(cls or TrainConfig), []
    for f in dataclasses.fields(cls or TrainConfig):
        if f.name in ("ds", "source"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += owned_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hints[f.name], f))
    return out


def help_text() -> str:
    """Every key we own with its type, default and description."""
    lines = []
    for key, tp, f in owned_fields():
        default = "required" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
            else repr(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        lines.append(f"{key}: {_type_name(tp)} = {default}\n    {f.metadata.get('doc', '')}")
    lines += [f"{key}: {tp} = {default}\n    {text}" for key, (tp, default, text) in OWNED_DS_KEYS.items()]
    lines.append("DeepSpeed keys passed through: " + ", ".join(sorted(DEEPSPEED_KEYS)))
    return "\n".join(lines)
