"""The one loader of model weights: any dir `files.locate` recognises -> each internal layer's
state dict in our layout, checked against the model's expected shapes.

Training (pipeline stage and ZeRO loads), conversion (hf_to_pp, pp_to_hg) and generation read
through `open_weights`. Layer files are memory-mapped; an HF dir is read tensor by tensor (only
the layers asked for). The HF <-> ours key mapping, fused projections included, is
models/keymap.py's; the family's HF_BASE_PREFIX lets hub checkpoints that store the base
model's keys unprefixed (bigscience's bloom) load like the others.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models.keymap import from_hf, hf_shapes, upgrade_layer
from models.pipeline import flat_layers

from engine.checkpoints.files import (INDEX_NAMES, LayoutError, ModelDir, check_layer, check_safetensors,
                                      check_tensor_dict, find_layer_file, load_layer, locate, read_json)
from engine.checkpoints.gdgpt import GdgptWeights
from engine.model import Model, expected_shapes


class HFWeights:
    """Random access to the tensors of an HF model dir (safetensors or .bin, sharded or not)."""

    def __init__(self, hf_dir: Path, base_prefix: str = ""):
        self.dir, self.base_prefix = hf_dir, base_prefix
        self.where: dict[str, Path] = {}
        self._checked: set[Path] = set()
        self._bin_cache: tuple[Path, dict] | None = None
        for index_name in INDEX_NAMES:
            if (hf_dir / index_name).is_file():
                index = read_json(hf_dir / index_name, "weight index")
                weight_map = index.get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise LayoutError(f"{hf_dir / index_name}: 'weight_map' must map tensor names to shard files")
                self.where = {k: hf_dir / f for k, f in weight_map.items()}
                self.index = hf_dir / index_name
                break
        else:
            self.index = None
            files = sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("pytorch_model*.bin"))
            for f in files:
                for key in self._keys(f):
                    if key in self.where:  # which copy wins would be a guess: the file order
                        raise LayoutError(f"{f}: tensor '{key}' is also in {self.where[key].name}, and no "
                                          f"index says which to use — remove the stray weight file")
                    self.where[key] = f
        if not self.where:
            raise LayoutError(f"{hf_dir}: no weights found (*.safetensors or pytorch_model*.bin)")
        self._alias: dict[str, str] = {}

    def _keys(self, f: Path):
        if f.suffix == ".safetensors":
            with self._safetensors(f) as fh:
                return list(fh.keys())
        return list(self._bin(f))

    def _safetensors(self, f: Path):
        if f not in self._checked:  # each shard's header is checked against its file once
            check_safetensors(f)
            self._checked.add(f)
        try:
            return safe_open(f, "pt")
        except SafetensorError as e:
            raise LayoutError(f"{f}: cannot be read as safetensors ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._file(key)
        key = self._alias.get(key, key)
        if f.suffix == ".safetensors":
            with self._safetensors(f) as fh:
                return tuple(fh.get_slice(key).get_shape())
        return tuple(self._bin(f)[key].shape)

    def get(self, key: str) -> torch.Tensor:
        f = self._file(key)
        key = self._alias.get(key, key)
        if f.suffix == ".safetensors":
            with self._safetensors(f) as fh:
                return fh.get_tensor(key)
        return self._bin(f)[key].clone()

    def _file(self, key: str) -> Path:
        if key not in self.where and self.base_prefix and key.startswith(self.base_prefix):
            bare = key[len(self.base_prefix):]  # some hub checkpoints store the base model unprefixed
            if bare in self.where:
                self.where[key] = self.where[bare]
                self._alias[key] = bare
        if key not in self.where:
            stray = self._unlisted(key)
            if stray is not None:
                raise LayoutError(f"{self.index}: does not list tensor '{key}', which {stray.name} holds — the index "
                                  "is incomplete (an interrupted or mixed download?)")
            raise LayoutError(f"{self.dir}: tensor '{key}' missing — not a checkpoint of this model family/size")
        f = self.where[key]
        if not f.is_file():
            raise LayoutError(f"{f}: weight shard listed in the index is missing")
        return f

    def _unlisted(self, key: str) -> Path | None:
        """A shard the index names that holds `key` although the index does not list it."""
        if self.index is None:
            return None
        for f in sorted(set(self.where.values())):
            if f.is_file() and f.suffix == ".safetensors" and key in check_safetensors(f):
                return f
        return None

    def _bin(self, f: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != f:  # one shard mapped at a time
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise LayoutError(f"{f}: cannot be read ({type(e).__name__})") from None
            self._bin_cache = (f, check_tensor_dict(f, state, kind="an HF weights file"))
        return self._bin_cache[1]


class LayerSource:
    """Each internal layer's weights of `model`, from a located dir (see `open_weights`)."""

    def __init__(self, model: Model, where: ModelDir, tag: str | None = None):
        self.model, self.where = model, where
        self.keys = model.family.hf_keys(model.args)
        self.shapes = expected_shapes(model.family, model.args)
        if where.is_hf:
            if tag is not None:
                raise LayoutError(f"{where.path}: an HF model dir has no checkpoint tags (tag {tag!r} asked for)")
            self.layer_dir, self.hf = None, HFWeights(where.hf_dir, getattr(model.family, "HF_BASE_PREFIX", ""))
        elif where.gdgpt:  # HF-named tensors in gdGPT's layer files: read through the HF key map
            self.layer_dir, self.hf = None, GdgptWeights(where.layers(tag), model.name, model.args.num_layers)
        else:
            self.layer_dir, self.hf = where.layers(tag), None
        ties, self.twins = set(), set()  # a tied twin's weights are its owner's (no layer file of its own)
        for idx, d in enumerate(flat_layers(model.family, model.args)):
            if d.tie is not None:
                (self.twins.add(idx) if d.tie in ties else ties.add(d.tie))

    def __len__(self) -> int:
        return len(self.shapes)

    def origin(self, idx: int) -> Path:
        """The file (layer file) or dir (HF) layer idx comes from, for messages."""
        return find_layer_file(self.layer_dir, idx) if self.layer_dir is not None else self.where.hf_dir

    def layer(self, idx: int) -> dict[str, torch.Tensor]:
        """Layer idx's state dict in our layout, its keys and shapes checked."""
        if self.layer_dir is not None:  # a file from before the fused projections is fused here
            state = upgrade_layer(self.keys[idx], load_layer(find_layer_file(self.layer_dir, idx)))
        else:  # HF's separate q/k/v, gate/up are joined here
            state = from_hf(self.keys[idx], self.hf.get)
        check_layer(self.origin(idx), state, self.shapes[idx])
        return state

    def verify(self) -> None:
        """Every owned layer's keys and shapes, before anything is written (HF: from the shard
        headers; layer files: memory-mapped, nothing read), and no layer files beyond the model's."""
        for idx, (names, want) in enumerate(zip(self.keys, self.shapes)):
            if set(names) != set(want):
                raise LayoutError(f"family {self.model.name}: key map of layer {idx} does not match its parameters")
            if idx in self.twins:
                continue
            if self.hf is None:
                self.layer(idx)
                continue
            for theirs, shape in hf_shapes(names, want).items():
                if self.hf.shape(theirs) != shape:
                    raise LayoutError(f"{self.where.hf_dir}: '{theirs}' has shape {list(self.hf.shape(theirs))}, "
                                      f"config.json implies {list(shape)}")
        beyond = find_layer_file(self.layer_dir, len(self)) if self.layer_dir is not None else None
        if beyond is not None and beyond.exists():
            raise LayoutError(f"{beyond}: checkpoint has more layers than config.json describes — another model")


def open_weights(path: str | Path, model: Model | None = None, tag: str | None = None) -> LayerSource:
    """The weights under `path` (pipeline checkpoint dir: `tag` or `latest`; HF model dir) for
    `model` (default: the model `path`'s own config describes). A LoRA run's dir reads as its base
    with its adapters merged in (engine/checkpoints/lora.py MergedSource)."""
    where = locate(path)
    if not where.is_hf and not where.gdgpt:
        from engine.checkpoints.lora import MergedSource, lora_run

        adapters = lora_run(where.layers(tag), Path(path), tag)
        if adapters is not None:
            return MergedSource(adapters, open_weights(adapters.base_dir(), model or adapters.model))
    return LayerSource(model or Model.from_dir(path), where, tag)


def load_stage(module, path: str | Path, model: Model) -> None:
    """Load a PipelineModule stage's layers, each checked before it is loaded; tied twins then
    take their owner's weights."""
    source = open_weights(path, model)
    for local_idx, layer in enumerate(module.forward_funcs):
        if hasattr(layer, "state_dict"):
            layer.load_state_dict(source.layer(local_idx + module._local_start))
    module._synchronize_tied_weights()
