"""HF checkpoint <-> pipeline checkpoint, streaming one layer at a time.

hf_to_pp reads HF safetensors (or .bin) shards tensor by tensor and writes one file per
pipeline layer; pp_to_hg reads layer files (memory-mapped) and writes safetensors shards with
an index. Both verify every key and shape against the family's layers before writing, and write
into a temporary directory renamed into place only when complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import family_for_hf_config

from engine.checkpoints.files import (INDEX_NAMES, LayoutError, StagingDir, check_layer, copy_hf_side_files, hf_dir_of,
                                      layer_file, load_layer, read_hf_config, read_json, resolve_tag, write_text_atomic)
from engine.model import expected_shapes

INIT_TAG = "global_step0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFWeights:
    """Random access to the tensors of an HF model dir (safetensors or .bin, sharded or not)."""

    def __init__(self, hf_dir: Path, base_prefix: str = ""):
        self.dir, self.base_prefix = hf_dir, base_prefix
        self.where: dict[str, Path] = {}
        for index_name in INDEX_NAMES:
            if (hf_dir / index_name).is_file():
                index = read_json(hf_dir / index_name, "weight index")
                self.where = {k: hf_dir / f for k, f in index["weight_map"].items()}
                break
        else:
            files = sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("pytorch_model*.bin"))
            for f in files:
                for key in self._keys(f):
                    self.where[key] = f
        if not self.where:
            raise LayoutError(f"{hf_dir}: no weights found (*.safetensors or pytorch_model*.bin)")
        self._bin_cache: tuple[Path, dict] | None = None
        self._alias: dict[str, str] = {}

    @staticmethod
    def _keys(f: Path):
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as fh:
                return list(fh.keys())
        return list(torch.load(f, map_location="cpu", weights_only=True, mmap=True))

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._file(key)
        key = self._alias.get(key, key)
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as fh:
                return tuple(fh.get_slice(key).get_shape())
        return tuple(self._bin(f)[key].shape)

    def get(self, key: str) -> torch.Tensor:
        f = self._file(key)
        key = self._alias.get(key, key)
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as fh:
                return fh.get_tensor(key)
        return self._bin(f)[key].clone()

    def _file(self, key: str) -> Path:
        if key not in self.where and self.base_prefix and key.startswith(self.base_prefix):
            bare = key[len(self.base_prefix):]  # some hub checkpoints store the base model unprefixed
            if bare in self.where:
                self.where[key] = self.where[bare]
                self._alias[key] = bare
        if key not in self.where:
            raise LayoutError(f"{self.dir}: tensor '{key}' missing — not a checkpoint of this model family/size")
        f = self.where[key]
        if not f.is_file():
            raise LayoutError(f"{f}: weight shard listed in the index is missing")
        return f

    def _bin(self, f: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != f:  # one shard mapped at a time
            try:
                self._bin_cache = (f, torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise LayoutError(f"{f}: cannot be read ({type(e).__name__})") from None
        return self._bin_cache[1]


def hf_to_pp(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a pipeline checkpoint dir (tag global_step0 + hf/) from an HF model dir."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf = read_hf_config(hf_dir)
    family = family_for_hf_config(hf, str(hf_dir / "config.json"))
    args = family.Args.from_hf_config(hf)
    keys, shapes = family.hf_keys(args), expected_shapes(family, args)
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise LayoutError(f"{hf_dir}: no tokenizer files ({' / '.join(TOKENIZER_FILES)}); "
                          "save the tokenizer with save_pretrained into this dir")
    weights = HFWeights(hf_dir, getattr(family, "HF_BASE_PREFIX", ""))
    for idx, (names, want) in enumerate(zip(keys, shapes)):  # verify everything before writing
        if set(names) != set(want):
            raise LayoutError(f"family {family.__name__}: key map of layer {idx} does not match its parameters")
        for ours, theirs in names.items():
            if weights.shape(theirs) != tuple(want[ours]):
                raise LayoutError(f"{hf_dir}: '{theirs}' has shape {list(weights.shape(theirs))}, config.json "
                                  f"implies {list(want[ours])}")
    with StagingDir(out_dir) as tmp:
        (tmp / INIT_TAG).mkdir()
        for idx, names in enumerate(keys):
            torch.save({ours: weights.get(theirs).contiguous() for ours, theirs in names.items()},
                       layer_file(tmp / INIT_TAG, idx))
        copy_hf_side_files(hf_dir, tmp / "hf")
        write_text_atomic(tmp / "latest", INIT_TAG)
    return out_dir


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
            save_file(self.pending, self.out / name, metadata={"format": "pt"})
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
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF model dir (safetensors shards + index + config + tokenizer) from a pipeline checkpoint."""
    pp_dir, out_dir = Path(pp_dir), Path(out_dir)
    tag_dir, hf_src = resolve_tag(pp_dir, tag), hf_dir_of(pp_dir)
    hf = read_hf_config(hf_src)
    family = family_for_hf_config(hf, str(hf_src / "config.json"))
    args = family.Args.from_hf_config(hf)
    keys, shapes = family.hf_keys(args), expected_shapes(family, args)
    dtypes, seen, twins = set(), set(), set()
    for idx, (want, names) in enumerate(zip(shapes, keys)):  # verify every layer file before writing anything
        if set(names.values()) <= seen and not layer_file(tag_dir, idx).exists():
            twins.add(idx)  # a tied twin: DeepSpeed writes no file for it, its owner holds the weight
            continue
        state = load_layer(layer_file(tag_dir, idx))
        check_layer(layer_file(tag_dir, idx), state, want)
        dtypes |= {t.dtype for t in state.values()}
        seen |= set(names.values())
    extra = layer_file(tag_dir, len(shapes))
    if extra.exists():
        raise LayoutError(f"{extra}: checkpoint has more layers than config.json describes — another model")
    with StagingDir(out_dir) as tmp:
        writer, written = ShardWriter(tmp, max_shard_bytes), set()
        for idx, names in enumerate(keys):
            if idx in twins:
                continue
            state = load_layer(layer_file(tag_dir, idx))
            for ours, theirs in names.items():
                if theirs not in written:  # a tied twin repeats its key
                    writer.add(theirs, state[ours])
                    written.add(theirs)
        writer.finish()
        copy_hf_side_files(hf_src, tmp)
        out_cfg = dict(hf)
        out_cfg["architectures"] = [family.HF_ARCHITECTURE]
        if len(dtypes) == 1:
            out_cfg["torch_dtype"] = out_cfg["dtype"] = DTYPE_NAMES.get(dtypes.pop(), "float32")
        if hasattr(family, "export_hf_config"):
            out_cfg = family.export_hf_config(out_cfg)
        if hasattr(family, "REMOTE_CODE_DIR"):
            for f in sorted(Path(family.REMOTE_CODE_DIR).glob("*.py")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True))
    return out_dir
