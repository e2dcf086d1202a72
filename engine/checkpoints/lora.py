"""Adapters on disk, in and out: our LoRA tags, PEFT adapter dirs, and their exports.

A LoRA tag is a training tag (tags.py, reshape.py) whose layer files hold only the trainable
parameters (adapters + modules_to_save, fp32) and whose optim/ holds only their state; meta.json
records `lora: {r, alpha, dropout, target_modules, modules_to_save, [PEFT options], base}`
(`base`: the run's model_path, where the frozen weights come from on resume and export) and
`lora_hash`, the checksum of that entry: the file checksums do not cover meta.json itself, and
an edited or damaged entry would misread every tensor. Every reader of a LoRA tag (resume,
demo, --lora-adapter, --merge-lora, model_path, lora.init_from) checks the entry against its hash
and against the tensors' shapes (r, targets) and the base's config.

A PEFT adapter dir (adapter_config.json + adapter_model.safetensors/.bin, as save_pretrained
writes it) is read by `PeftAdapter`: every adapter_config.json field is known (an unknown one,
or an option we do not implement set away from its default, is one line naming it) and every
tensor is mapped onto the model's layers with its shape checked. Both kinds are an `AdapterSource`
(`open_adapter`): spec + per-layer trainable state in our names. The layer math and the names
are models/lora.py's.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import lora as L

from engine.checkpoints.files import (LayoutError, StagingDir, check_tensor_dict, is_pipeline_dir, layer_file,
                                      load_layer, read_json, resolve_tag)
from engine.model import Model

ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
SCRATCH = "scratch"
SOURCE = "source.json"  # hf_to_pp's record of the HF dir or hub id a pipeline dir was converted from


# ----------------------------------------------------------------------------- meta.json's lora entry
def record(cfg) -> dict | None:
    """meta.json's `lora` entry of a run (None: not a LoRA run)."""
    spec = L.LoraSpec.of(cfg.lora)
    base = SCRATCH if cfg.from_scratch else str(Path(cfg.model_path).absolute())  # scratch: benchmarks' random base
    return None if spec is None else {**spec.record(), "base": base}


def digest(entry: dict, algo: str | None = None) -> str:
    """meta.json's `lora_hash`: the checksum of the `lora` entry (canonical JSON)."""
    from engine.checkpoints import integrity

    h = integrity.new_hash(algo or integrity.ALGO)
    h.update(json.dumps(entry, sort_keys=True).encode())
    return h.hexdigest()


def entry_of(tag_dir: Path, meta: dict) -> dict | None:
    """The `lora` entry of a tag's meta.json, checked against its recorded hash (tags from before
    the hash have none to check)."""
    from engine.checkpoints import integrity

    entry = meta.get("lora")
    if entry is None:
        return None
    where = tag_dir / "meta.json"
    if not isinstance(entry, dict):
        raise LayoutError(f"{where}: 'lora' must be a JSON object, got {json.dumps(entry)[:60]}")
    algo = meta.get("hash", integrity.ALGO)
    if "lora_hash" in meta and integrity.available(algo) and digest(entry, algo) != meta["lora_hash"]:
        raise LayoutError(f"{where}: the 'lora' entry does not match its checksum (lora_hash): edited or damaged; "
                          "its adapters cannot be read safely")
    return entry


def of_tag(tag_dir: Path) -> dict | None:
    """The `lora` entry of a tag's meta.json (None: a full checkpoint, or no meta.json), hash checked."""
    meta = tag_dir / "meta.json"
    return entry_of(tag_dir, read_json(meta, "checkpoint meta.json")) if meta.is_file() else None


def spec_of_entry(tag_dir: Path, entry: dict) -> L.LoraSpec:
    """The LoraSpec a `lora` entry records; a malformed field is one line naming it."""
    for key, ok in (("r", lambda v: isinstance(v, int) and v > 0), ("alpha", lambda v: isinstance(v, (int, float))),
                    ("target_modules", lambda v: isinstance(v, (str, list))), ("base", lambda v: isinstance(v, str))):
        if not ok(entry.get(key)):
            raise LayoutError(f"{tag_dir / 'meta.json'}: lora.{key} is {json.dumps(entry.get(key))[:60]}: damaged")
    return L.LoraSpec.of(entry)


def same_base(base: str) -> str:
    """A base path as resume compares it: the directory it names (symlinks and `..` resolved)."""
    return base if base == SCRATCH else os.path.realpath(base)


def check_resume(tag_dir: Path, saved: dict | None, cfg) -> None:
    """A LoRA run resumes only a LoRA tag of the same adapters, and a full run only a full tag;
    the tag's tensors are what its meta.json says."""
    ours = record(cfg)
    strip = (lambda r: {k: v for k, v in r.items() if k not in ("base", "init_lora_weights")} if r else None)  # noqa: E731
    # (how fresh adapters were initialised does not matter to a resume)
    if strip(saved) != strip(ours):
        what = lambda r: f"LoRA {strip(r)}" if r else "full fine-tuning"  # noqa: E731
        raise LayoutError(f"{tag_dir}: saved by {what(saved)}, but the config asks for {what(ours)}; use a new "
                          f"save_path (or the config that wrote it)")
    if saved is not None and same_base(saved["base"]) != same_base(ours["base"]):  # resume loads model_path's weights
        raise LayoutError(f"{tag_dir / 'meta.json'}: lora.base: its adapters were trained on {saved['base']}, but "
                          f"model_path is {cfg.model_path}; resume with model_path: {saved['base']}, or use a new "
                          f"save_path")
    if saved is not None:
        check_tensors(tag_dir, spec_of_entry(tag_dir, saved), Model.from_dir(cfg.model_path))


def expected(family, args, spec: L.LoraSpec) -> list[dict[str, tuple[int, ...]]]:
    """Per internal layer: {trainable parameter: shape} of `spec` on the model (built on the meta device)."""
    from models.pipeline import SequentialModel

    with torch.device("meta"):
        model = SequentialModel(family, args)
    L.add_lora(model.owned_layers(), family, args, spec, seed=0)
    return [{n: tuple(p.shape) for n, p in layer.named_parameters() if p.requires_grad}
            for _, layer in model.owned_layers()]


def check_tensors(tag_dir: Path, spec: L.LoraSpec, model: Model) -> None:
    """A LoRA tag's layer files against its meta.json's entry: the same parameters (targets,
    modules_to_save) with the shapes its r gives. One line naming the file and the field."""
    for idx, want in enumerate(expected(model.family, model.args, spec)):
        path = layer_file(tag_dir, idx)
        if not want:
            if path.is_file():
                raise LayoutError(f"{path}: adapters for a layer meta.json's lora.target_modules "
                                  f"({spec.target_modules}) does not adapt: the tag and its meta.json disagree")
            continue
        state = load_layer(path)  # memory-mapped: shapes only
        extra, missing = sorted(set(state) - set(want)), sorted(set(want) - set(state))
        if extra or missing:
            what = f"holds '{extra[0]}'" if extra else f"lacks '{missing[0]}'"
            raise LayoutError(f"{path}: {what}, which meta.json's lora.target_modules / modules_to_save "
                              f"({spec.target_modules} / {list(spec.modules_to_save)}) "
                              f"{'do not select' if extra else 'select'}: the tag and its meta.json disagree")
        for name, shape in want.items():
            got = tuple(state[name].shape)
            if got != shape:
                parts = L.split_name(name)
                if parts is not None and parts[1] != L.MAGNITUDE and got[parts[1] == "lora_B"] != spec.r:
                    raise LayoutError(f"{path}: '{name}' has r {got[parts[1] == 'lora_B']}, meta.json's lora.r is "
                                      f"{spec.r}: the tag and its meta.json disagree")
                raise LayoutError(f"{path}: '{name}' has shape {list(got)}, the model expects {list(shape)} (meta.json's "
                                  "lora.base is another model)")


def check_base(where: Path, base: Path, model: Model) -> None:
    """The base a LoRA tag names has the model's config (hidden size, layer count, ...)."""
    theirs = Model.from_dir(base)
    if theirs.name != model.name:
        raise LayoutError(f"{where}: lora.base {base} is a {theirs.name} model, the adapters are for {model.name}")
    import dataclasses

    for f in dataclasses.fields(model.args):
        a, b = getattr(model.args, f.name), getattr(theirs.args, f.name)
        if a != b:
            raise LayoutError(f"{where}: lora.base {base} has {f.name} {b}, the adapters' model has {a}: another base")


# ----------------------------------------------------------------------------- adapter sources
class AdapterSource:
    """Trained adapters for a model: `spec`, and per internal layer its trainable state in our names."""

    spec: L.LoraSpec
    where: Path

    def layer(self, idx: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def base_name(self) -> str | None:
        """What PEFT should load the base from (adapter_config.json's base_model_name_or_path)."""
        raise NotImplementedError


def base_model_name(base: str | Path) -> str | None:
    """The HF dir or hub id a base (model_path) came from, as PEFT's base_model_name_or_path: an HF
    dir itself; a pipeline dir: the source hf_to_pp recorded; a LoRA run: none (its merged model
    exists only after --merge-lora); an older pipeline dir: None (the caller says so)."""
    base = Path(base)
    if not is_pipeline_dir(base):
        return str(base.absolute()) if (base / "config.json").is_file() else None
    if (base / SOURCE).is_file():
        name = read_json(base / SOURCE, "hf_to_pp source record").get("base_model_name_or_path")
        return name if isinstance(name, str) else None
    return None


class Adapters(AdapterSource):
    """A LoRA tag's trained tensors per layer, checked against its meta.json, with what is needed to export them."""

    def __init__(self, save_dir: str | Path, tag: str | None = None):
        from engine.checkpoints import integrity

        self.tag_dir = self.where = resolve_tag(save_dir, tag)
        self.info = of_tag(self.tag_dir)
        if self.info is None:
            raise LayoutError(f"{self.tag_dir}: not a LoRA checkpoint (its meta.json has no 'lora' entry)")
        integrity.verify_weights(self.tag_dir)  # sizes + hashes of the layer files
        self.spec = spec_of_entry(self.tag_dir, self.info)
        self.model = Model.from_dir(save_dir)
        self.keys = self.model.family.hf_keys(self.model.args)
        check_tensors(self.tag_dir, self.spec, self.model)
        if self.info["base"] != SCRATCH and Path(self.info["base"]).exists():
            check_base(self.tag_dir / "meta.json", Path(self.info["base"]), self.model)

    def layer(self, idx: int) -> dict[str, torch.Tensor]:
        path = layer_file(self.tag_dir, idx)
        return dict(load_layer(path)) if path.is_file() else {}

    def base_dir(self) -> Path:
        if self.info["base"] == SCRATCH:
            raise LayoutError(f"{self.tag_dir}: a LoRA run on a random base (from_scratch: true); it has no base to "
                              "export with")
        base = Path(self.info["base"])
        if not base.exists():
            raise LayoutError(f"{self.tag_dir}/meta.json: the base model {base} (the run's model_path) is gone; "
                              "the LoRA checkpoint holds only the adapters")
        return base

    def base_name(self) -> str | None:
        return None if self.info["base"] == SCRATCH else base_model_name(self.info["base"])


# PEFT's LoraConfig fields (peft 0.22): read here, metadata, and options we do not implement (accepted only at
# their default: a set value would change the model, and ignoring it would be a wrong answer)
PEFT_READ = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora", "init_lora_weights",
             "layers_to_transform", "layers_pattern", "use_dora")
PEFT_METADATA = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "megatron_core", "runtime_config", "qalora_group_size")
PEFT_DEFAULTS = {"fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
                 "megatron_config": None, "trainable_token_indices": None, "loftq_config": {}, "eva_config": None,
                 "corda_config": None, "astra_config": None, "lora_ga_config": None, "velora_config": None,
                 "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
                 "layer_replication": None, "lora_bias": False, "target_parameters": None, "use_bdlora": None,
                 "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False, "exclude_modules": None}


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def peft_base(adapter_dir: str | Path) -> str:
    """The base a PEFT adapter dir names (its base_model_name_or_path), where no base is given."""
    cfg_path = Path(adapter_dir) / ADAPTER_CONFIG
    base = read_json(cfg_path, "PEFT adapter config").get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise LayoutError(f"{cfg_path}: no base_model_name_or_path: give the base model (--model / --input-path) and "
                          "this dir as --adapter")
    return base


def peft_spec(cfg_path: Path, cfg: dict) -> L.LoraSpec:
    """The LoraSpec of a PEFT adapter_config.json; anything else in it is one line naming the key."""
    def bad(key, what):
        raise LayoutError(f"{cfg_path}: {key}: {what}")

    if cfg.get("peft_type") != "LORA":
        bad("peft_type", f"{cfg.get('peft_type')!r}, only LORA adapters are supported")
    for key, value in cfg.items():
        if key in PEFT_READ or key in PEFT_METADATA:
            continue
        if key not in PEFT_DEFAULTS:
            bad(key, "not a field of PEFT's LoraConfig known here (a newer peft's option?): remove it if it is at "
                     "its default, else the adapter needs what it configures")
        default = PEFT_DEFAULTS[key]
        if value != default and not (default in (None, {}, False) and value in (None, {}, [], False)):
            bad(key, f"{json.dumps(value)[:60]} is not implemented here (only its default {json.dumps(default)})")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        bad("r", f"{json.dumps(r)} must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        bad("lora_alpha", f"{json.dumps(alpha)} must be a number > 0")
    init = cfg.get("init_lora_weights", True)
    if init not in L.INITS:
        bad("init_lora_weights", f"{json.dumps(init)}: only true, false and gaussian are implemented (PiSSA, OLoRA, "
                                 "LoftQ and the like change the base weights too)")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets.lower() == L.ALL_LINEAR:
        targets = L.ALL_LINEAR
    if not targets or not isinstance(targets, (str, list)):
        bad("target_modules", f"{json.dumps(targets)[:60]}: expected a list of module names, a regex or all-linear")
    layers, pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if layers is not None and not (isinstance(layers, int) or isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        bad("layers_to_transform", f"{json.dumps(layers)[:60]}: expected block indices")
    return L.LoraSpec.of({"r": r, "alpha": alpha, "dropout": cfg.get("lora_dropout", 0.0) or 0.0,
                          "target_modules": targets, "modules_to_save": cfg.get("modules_to_save"),
                          "use_rslora": bool(cfg.get("use_rslora", False)), "init_lora_weights": init,
                          "layers_to_transform": None if layers in (None, []) else layers,
                          "layers_pattern": pattern or None, "use_dora": bool(cfg.get("use_dora", False))})


def _peft_tensors(adapter_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's tensors by PEFT key, without the adapter-name infix ('.default') or
    ModulesToSaveWrapper's ('.modules_to_save')."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_dir / ADAPTER_WEIGHTS
    if path.is_file():
        from engine.checkpoints.files import check_safetensors

        check_safetensors(path)
        try:
            raw = load_file(path)
        except SafetensorError as e:
            raise LayoutError(f"{path}: cannot be read as safetensors ({e})") from None
    elif (adapter_dir / ADAPTER_BIN).is_file():
        path = adapter_dir / ADAPTER_BIN
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated / corrupt / not a torch file
            raise LayoutError(f"{path}: cannot be read ({type(e).__name__})") from None
        raw = check_tensor_dict(path, raw, kind="an adapter weights file")
    else:
        raise LayoutError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN}) beside {ADAPTER_CONFIG}")
    out = {}
    for key, t in raw.items():
        key = key.replace(".default.", ".").replace(".modules_to_save.", ".")
        if key.endswith(f".{L.MAGNITUDE}.weight"):  # older peft saved DoRA's magnitude as a Linear's weight
            key = key[:-len(".weight")]
        out[key if key.startswith(L.PEFT_PREFIX) else L.PEFT_PREFIX + key] = t
    return path, out


class PeftAdapter(AdapterSource):
    """A PEFT adapter dir for `model`: its config read strictly, every tensor placed on a layer of
    the model and shape-checked (another base's adapter is one line naming the field)."""

    def __init__(self, adapter_dir: str | Path, model: Model):
        self.where = Path(adapter_dir)
        self.cfg_path = self.where / ADAPTER_CONFIG
        self.cfg = read_json(self.cfg_path, "PEFT adapter config")
        self.spec = peft_spec(self.cfg_path, self.cfg)
        self.model = model
        try:
            L.check_spec(self.spec, model.family, model.args)
        except ValueError as e:
            msg = str(e).replace("lora.target_modules", "target_modules").replace("lora.layers_", "layers_")
            raise LayoutError(f"{self.cfg_path}: {msg.replace('lora.modules_to_save', 'modules_to_save')} — an "
                              f"adapter for another model") from None
        self.file, tensors = _peft_tensors(self.where)
        keys = model.family.hf_keys(model.args)
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        placed: dict[str, list] = {}  # a tied embedding's one key serves the layers that hold it
        for idx, want in enumerate(expected(model.family, model.args, self.spec)):
            for name, shape in want.items():
                placed.setdefault(L.peft_name(keys[idx], name), []).append((idx, name, shape))
        for key, t in tensors.items():
            if key not in placed:
                self._stray(key, keys)
            for idx, name, shape in placed[key]:
                if tuple(t.shape) != shape:
                    self._shape(key, name, tuple(t.shape), shape)
                self.states.setdefault(idx, {})[name] = t
        missing = sorted(set(placed) - set(tensors))
        if missing:
            raise LayoutError(f"{self.file}: no '{missing[0]}', which target_modules {self._targets()} selects on this "
                              f"model — an adapter for other targets (or another base)")

    def _targets(self) -> str:
        return json.dumps(self.cfg.get("target_modules"))[:80]

    def _stray(self, key: str, keys: list[dict]) -> None:
        n_blocks = len({L.layer_index(hf) for hf in L.all_targets(self.model.family, self.model.args)} - {None})
        i = L.layer_index(key[len(L.PEFT_PREFIX):])
        if i is not None and i >= n_blocks and any(k in key for k in L.KINDS):
            raise LayoutError(f"{self.file}: '{key}' is for block {i}, this base has {n_blocks} blocks — layer count "
                              "differs: an adapter for another model")
        raise LayoutError(f"{self.file}: '{key}' adapts no module of this base that target_modules "
                          f"{self._targets()} selects — targets differ: an adapter for another model or config")

    def _shape(self, key: str, name: str, got: tuple, want: tuple) -> None:
        kind = (L.split_name(name) or (None, None, None))[1]
        if kind in ("lora_A", "lora_B") and got[kind == "lora_B"] != self.spec.r:
            raise LayoutError(f"{self.file}: '{key}' has r {got[kind == 'lora_B']}, adapter_config.json's r is "
                              f"{self.spec.r} — the adapter's config and tensors disagree")
        if kind == "lora_A":
            field = f"in_features (hidden size) {got[1]}, this base's linear takes {want[1]}"
        elif kind is not None:
            field = f"out_features (hidden size) {got[0]}, this base's linear gives {want[0]}"
        else:
            field = f"shape {list(got)}, this base's module has {list(want)}"
        raise LayoutError(f"{self.file}: '{key}' has {field} — an adapter for another model")

    def layer(self, idx: int) -> dict[str, torch.Tensor]:
        return dict(self.states.get(idx, {}))

    def base_name(self) -> str | None:
        name = self.cfg.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None


def open_adapter(path: str | Path, model: Model, what: str = "adapter") -> AdapterSource:
    """A PEFT adapter dir, or a LoRA run's save_path (its `latest` tag), as adapters for `model`."""
    path = Path(path)
    if is_peft_dir(path):
        return PeftAdapter(path, model)
    if is_pipeline_dir(path):
        src = Adapters(path)
        if src.model.name != model.name or src.model.args != model.args:
            check_base(src.tag_dir / "meta.json", model.hf_dir, src.model)
        return src
    if not path.exists():
        raise LayoutError(f"{path}: {what} does not exist")
    raise LayoutError(f"{path}: not an adapter: neither a PEFT adapter dir (no {ADAPTER_CONFIG}) nor a LoRA run's "
                      "save_path (no 'latest' file)")


def check_same(source: AdapterSource, spec: L.LoraSpec, model: Model, key: str) -> None:
    """lora.init_from: the adapter is what the config's lora keys describe (one line naming the field)."""
    theirs = source.spec
    for field in ("r", "alpha", "use_rslora", "use_dora", "modules_to_save"):
        a, b = getattr(spec, field), getattr(theirs, field)
        if (set(a) if field == "modules_to_save" else a) != (set(b) if field == "modules_to_save" else b):
            raise LayoutError(f"{source.where}: {key}: the adapter has {field} {b!r}, the config's lora.{field} is "
                              f"{a!r}; set lora.{field}: {json.dumps(list(b) if isinstance(b, tuple) else b)}")
    targets = L.all_targets(model.family, model.args)
    ours, adapted = [t for t in targets if spec.targets(t)], [t for t in targets if theirs.targets(t)]
    if ours != adapted:
        diff = sorted(set(ours) ^ set(adapted))[0]
        raise LayoutError(f"{source.where}: {key}: the adapter {'adapts' if diff in adapted else 'does not adapt'} "
                          f"{diff}, the config's lora.target_modules / layers_to_transform "
                          f"{'do not' if diff in adapted else 'do'}; set them as the adapter's "
                          f"({json.dumps(theirs.target_modules if isinstance(theirs.target_modules, str) else list(theirs.target_modules))})")


def init_adapters(cfg, spec: L.LoraSpec, model: Model) -> AdapterSource | None:
    """lora.init_from, opened and checked against the run's lora keys (None when unset)."""
    if not cfg.lora.init_from:
        return None
    source = open_adapter(cfg.lora.init_from, model, "lora.init_from")
    check_same(source, spec, model, "lora.init_from")
    return source


def load_adapters(layers, source: Path | AdapterSource) -> None:
    """Set the trainable parameters of `layers` ((global index, module) pairs) from a LoRA tag's
    layer files or an adapter source; the frozen base came from model_path."""
    for idx, layer in layers:
        names = [n for n, p in layer.named_parameters() if p.requires_grad]
        if not names:
            continue
        if isinstance(source, AdapterSource):
            path, state = source.where, source.layer(idx)
        else:
            path = layer_file(source, idx)
            state = load_layer(path)
        if sorted(state) != sorted(names):
            raise LayoutError(f"{path}: holds {sorted(state)[:4]}..., the run trains {sorted(names)[:4]}... "
                              "(another LoRA configuration)")
        params = dict(layer.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(state[n].reshape(params[n].shape))


class MergedSource:
    """A LoRA run's dir read as a model (model_path, hf_to_pp-like readers): each layer of its base
    (`base`, the base dir's weights.LayerSource) with the run's adapters merged in, in the base's
    dtype; the interface of weights.LayerSource (weights.open_weights makes it)."""

    def __init__(self, adapters: Adapters, base):
        self.adapters, self.base = adapters, base
        self.model, self.where, self.keys = base.model, base.where, base.keys
        self.shapes, self.twins, self.layer_dir, self.hf = base.shapes, base.twins, None, None

    def __len__(self) -> int:
        return len(self.shapes)

    def origin(self, idx: int) -> Path:
        return self.adapters.tag_dir

    def layer(self, idx: int) -> dict[str, torch.Tensor]:
        return L.merge(self.keys[idx], self.base.layer(idx), self.adapters.layer(idx), self.adapters.spec.scaling)

    def verify(self) -> None:
        self.base.verify()


def lora_run(tag_dir: Path, path: Path, tag: str | None) -> Adapters | None:
    """The adapters of a LoRA run's dir (`tag_dir`: the tag read), checked; None: not a LoRA tag."""
    return Adapters(path, tag) if of_tag(tag_dir) is not None else None


# ----------------------------------------------------------------------------- exports
def write_peft(out: str | Path, family, args, spec: L.LoraSpec, states: dict[int, dict[str, torch.Tensor]],
               base: str | None) -> Path:
    """A PEFT adapter dir (adapter_config.json + adapter_model.safetensors, PEFT's key names for the
    HF model) from each layer's trainable state in our names."""
    keys, tensors, targets = family.hf_keys(args), {}, set()
    for idx, state in sorted(states.items()):
        tensors.update(L.to_peft(keys[idx], state))
        targets |= {L.split_name(n)[2] for n in state if L.split_name(n)}
    with StagingDir(out) as tmp:
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, tmp / ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(L.peft_config(spec, sorted(targets), base), indent=2))
    return Path(out)


def export_adapter(save_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """`convert_model.py pp_to_hg --lora-adapter OUT`: a LoRA tag as a PEFT adapter dir whose
    base_model_name_or_path is what the run trained from (AutoPeftModelForCausalLM loads it)."""
    src = Adapters(save_dir, tag)
    states = {idx: src.layer(idx) for idx in range(len(src.keys))}
    base = src.base_name()
    if base is None:
        base = str(Path(src.info["base"]) / "hf") if src.info["base"] != SCRATCH else None
        print(f"note: {out}: base_model_name_or_path is {base}, which holds no weights (the run's model_path "
              f"{src.info['base']} records no HF source: converted by an older hf_to_pp, a LoRA run, or random); "
              "set it to the HF dir or hub id of the base before AutoPeftModelForCausalLM.from_pretrained",
              file=sys.stderr)
    return write_peft(out, src.model.family, src.model.args, src.spec, {i: s for i, s in states.items() if s}, base)


def read_peft(adapter_dir: str | Path, model: Model) -> tuple[L.LoraSpec, dict[int, dict[str, torch.Tensor]]]:
    """A PEFT LoRA adapter dir's spec and per-layer tensors (our names) for `model`."""
    src = PeftAdapter(adapter_dir, model)
    return src.spec, src.states
