"""HF checkpoint <-> pipeline checkpoint, streaming one layer at a time.

hf_to_pp reads HF safetensors (or .bin) shards tensor by tensor and writes one file per
pipeline layer; pp_to_hg reads layer files (memory-mapped) and writes safetensors shards with
an index. Both read through engine/checkpoints/weights.py (which verifies every key and shape
against the family's layers before anything is written) and write into a temporary directory
renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from models.keymap import to_hf
from models.lora import merge

from engine.checkpoints import integrity
from engine.checkpoints.files import (LayoutError, StagingDir, copy_hf_side_files, layer_file, read_hf_config, resolve_tag,
                                      write_text_atomic)
from engine.checkpoints.weights import open_weights

INIT_TAG = "global_step0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def source_dtype(hf_cfg: dict) -> str | None:
    """The dtype the source model was distributed in, as its config.json names it (transformers 5:
    `dtype`, before: `torch_dtype`); kept in <pp dir>/hf/config.json by hf_to_pp and training."""
    name = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    return name if name in DTYPES else None


def hf_to_pp(hf_dir: str | Path, out_dir: str | Path, source_name: str | None = None) -> Path:
    """Write a pipeline checkpoint dir (tag global_step0 + hf/) from an HF model dir. `source_name`
    (the hub id or dir the user gave; default: the dir) is recorded in source.json: adapters trained
    on the pipeline dir name it as PEFT's base_model_name_or_path (engine/checkpoints/lora.py)."""
    source = open_weights(hf_dir)
    if not source.where.is_hf:
        raise LayoutError(f"{hf_dir}: already a pipeline checkpoint dir (it has 'latest'); use it as model_path")
    if not any((source.where.hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise LayoutError(f"{source.where.hf_dir}: no tokenizer files ({' / '.join(TOKENIZER_FILES)}); "
                          "save the tokenizer with save_pretrained into this dir")
    source.verify()  # every key and shape before writing
    with StagingDir(out_dir) as tmp:
        (tmp / INIT_TAG).mkdir()
        for idx in range(len(source)):  # HF's separate q/k/v, gate/up joined into our fused tensors
            with open(layer_file(tmp / INIT_TAG, idx), "wb") as fh:  # a Python file: a failed write is an OSError
                torch.save({ours: t.contiguous() for ours, t in source.layer(idx).items()}, fh)
        copy_hf_side_files(source.where.hf_dir, tmp / "hf")
        _record_dtype(tmp / "hf" / "config.json", source)
        from engine.checkpoints.lora import SOURCE
        (tmp / SOURCE).write_text(json.dumps({"base_model_name_or_path": source_name or str(Path(hf_dir).absolute())}))
        write_text_atomic(tmp / "latest", INIT_TAG)
    return Path(out_dir)


def _record_dtype(config_path: Path, source) -> None:
    """A config.json without a dtype gets the source tensors' one, so pp_to_hg exports in it later."""
    cfg = json.loads(config_path.read_text())
    if source_dtype(cfg) is None:
        dtypes = {t.dtype for t in source.layer(0).values()}
        if len(dtypes) == 1 and next(iter(dtypes)) in DTYPE_NAMES:
            cfg["torch_dtype"] = DTYPE_NAMES[next(iter(dtypes))]
            config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


class ShardWriter:
    """Accumulate tensors into safetensors shards of at most `max_bytes`, then write the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.shards, self.total = 0, [], 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if self.pending:
            name = f"part-{len(self.shards):05d}.safetensors"
            try:
                save_file(self.pending, self.out / name, metadata={"format": "pt"})
            except SafetensorError as e:  # the library's I/O errors carry the errno only in their text
                code = re.search(r"\(os error (\d+)\)", str(e))
                if code is None:
                    raise
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(self.out / name)) from None
            self.shards.append((name, list(self.pending)))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n, weight_map = len(self.shards), {}
        for i, (tmp_name, keys) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp_name).rename(self.out / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def pp_to_hg(pp_dir: str | Path, out_dir: str | Path, tag: str | None = None,
             max_shard_bytes: int = 5 * 2**30, dtype: str = "auto", merge_lora: bool = False,
             adapter: str | Path | None = None) -> Path:
    """Write an HF model dir (safetensors shards + index + config + tokenizer) from a pipeline checkpoint.

    `dtype`: the tensors' dtype in the export; "auto" is the source model's (its config.json's, see
    source_dtype), else the layer files' own. Training checkpoints hold fp32 masters, so a bf16
    model trained in any precision is exported in bf16 again. A LoRA checkpoint (adapters only)
    needs `merge_lora`: its base model (meta.json's `base`) with the adapters merged in. `adapter`
    (a PEFT adapter dir or a LoRA run), with `merge_lora`: merged into `pp_dir`, a pipeline or HF dir;
    a PEFT adapter dir as `pp_dir` is merged into the base its base_model_name_or_path names.
    Merged in fp32, then cast to the export's dtype (float32: no rounding on the way)."""
    from engine.checkpoints.hub import model_source
    from engine.checkpoints.lora import Adapters, is_peft_dir, of_tag, open_adapter, peft_base

    lora = None
    if adapter is None and is_peft_dir(pp_dir):
        adapter = pp_dir
        pp_dir = peft_base(pp_dir)
    if adapter is not None:
        if not merge_lora:
            raise LayoutError(f"{adapter}: an adapter: merge it into its base with --merge-lora")
        source = open_weights(model_source(pp_dir), tag=tag)
        lora = open_adapter(adapter, source.model)
    elif (Path(pp_dir) / "latest").exists() and of_tag(resolve_tag(pp_dir, tag)) is not None:
        if not merge_lora:
            raise LayoutError(f"{resolve_tag(pp_dir, tag)}: a LoRA checkpoint (adapters only): export it with "
                              f"--lora-adapter OUT (a PEFT adapter dir) or --merge-lora (a plain HF model)")
        lora = Adapters(pp_dir, tag)
        source = open_weights(lora.base_dir(), lora.model)
    else:
        source = open_weights(pp_dir, tag=tag)
        if source.where.is_hf:
            raise LayoutError(f"{pp_dir}: not a pipeline checkpoint dir (no 'latest' file)")
    family, hf_src = source.model.family, source.where.hf_dir
    if source.layer_dir is not None:  # (gdGPT's layer dirs have no meta.json)
        integrity.verify_weights(source.layer_dir)  # sizes + hashes of the layer files (meta.json), before reading
    source.verify()  # every layer file's keys and shapes before writing anything
    if dtype != "auto" and dtype not in DTYPES:
        raise LayoutError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    out_dtype = DTYPES.get(dtype if dtype != "auto" else source_dtype(read_hf_config(hf_src)))
    dtypes = set()
    with StagingDir(out_dir) as tmp:
        writer, written = ShardWriter(tmp, max_shard_bytes), set()
        for idx, names in enumerate(source.keys):
            if idx in source.twins:  # its owner holds the weight (DeepSpeed writes no file for it)
                continue
            state = source.layer(idx)
            if lora is not None:
                state = merge(names, state, lora.layer(idx), lora.spec.scaling, out_dtype)
            if out_dtype is not None:
                state = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in state.items()}
            dtypes |= {t.dtype for t in state.values()}
            for theirs, tensor in to_hf(names, state).items():  # our fused tensors split into HF's
                if theirs not in written:
                    writer.add(theirs, tensor)
                    written.add(theirs)
        writer.finish()
        copy_hf_side_files(hf_src, tmp)
        out_cfg = read_hf_config(hf_src)
        out_cfg["architectures"] = [family.HF_ARCHITECTURE]
        if len(dtypes) == 1:
            out_cfg["torch_dtype"] = out_cfg["dtype"] = DTYPE_NAMES.get(dtypes.pop(), "float32")
        if hasattr(family, "export_hf_config"):
            out_cfg = family.export_hf_config(out_cfg)
        if hasattr(family, "REMOTE_CODE_DIR"):
            for f in sorted(Path(family.REMOTE_CODE_DIR).glob("*.py")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True))
    return Path(out_dir)

