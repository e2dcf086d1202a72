"""LoRA runs on disk: adapter-only checkpoint tags, and their exports (PEFT adapter, merged HF model).

A LoRA tag is a training tag (tags.py, reshape.py) whose layer files hold only the trainable
parameters (adapters + modules_to_save, fp32) and whose optim/ holds only their state; meta.json
records `lora: {r, alpha, dropout, target_modules, modules_to_save, base}` (`base`: the run's
model_path, where the frozen weights come from on resume and export). The layer math and the
names are models/lora.py's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import lora as L

from engine.checkpoints.files import LayoutError, StagingDir, layer_file, load_layer, read_json, resolve_tag
from engine.model import Model

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SCRATCH = "scratch"


def record(cfg) -> dict | None:
    """meta.json's `lora` entry of a run (None: not a LoRA run)."""
    spec = L.LoraSpec.of(cfg.lora)
    base = SCRATCH if cfg.from_scratch else str(Path(cfg.model_path).absolute())  # scratch: benchmarks' random base
    return None if spec is None else {**spec.record(), "base": base}


def of_tag(tag_dir: Path) -> dict | None:
    """The `lora` entry of a tag's meta.json (None: a full checkpoint, or no meta.json)."""
    meta = tag_dir / "meta.json"
    return read_json(meta, "checkpoint meta.json").get("lora") if meta.is_file() else None


def check_resume(tag_dir: Path, saved: dict | None, cfg) -> None:
    """A LoRA run resumes only a LoRA tag of the same adapters, and a full run only a full tag."""
    ours = record(cfg)
    strip = (lambda r: {k: v for k, v in r.items() if k != "base"} if r else None)
    if strip(saved) != strip(ours):
        what = lambda r: f"LoRA {strip(r)}" if r else "full fine-tuning"  # noqa: E731
        raise LayoutError(f"{tag_dir}: saved by {what(saved)}, but the config asks for {what(ours)}; use a new "
                          f"save_path (or the config that wrote it)")


def load_adapters(layers, tag_dir: Path) -> None:
    """Set the trainable parameters of `layers` ((global index, module) pairs) from a LoRA tag's
    layer files; the frozen base came from model_path."""
    for idx, layer in layers:
        names = [n for n, p in layer.named_parameters() if p.requires_grad]
        if not names:
            continue
        path = layer_file(tag_dir, idx)
        state = load_layer(path)
        if sorted(state) != sorted(names):
            raise LayoutError(f"{path}: holds {sorted(state)[:4]}..., the run trains {sorted(names)[:4]}... "
                              "(another LoRA configuration)")
        params = dict(layer.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(state[n].reshape(params[n].shape))


class Adapters:
    """A LoRA tag's trained tensors per layer, with what is needed to export them."""

    def __init__(self, save_dir: str | Path, tag: str | None = None):
        from engine.checkpoints import integrity

        self.tag_dir = resolve_tag(save_dir, tag)
        self.info = of_tag(self.tag_dir)
        if self.info is None:
            raise LayoutError(f"{self.tag_dir}: not a LoRA checkpoint (its meta.json has no 'lora' entry)")
        integrity.verify_weights(self.tag_dir)  # sizes + hashes of the layer files
        self.spec = L.LoraSpec.of(self.info)
        self.model = Model.from_dir(save_dir)
        self.keys = self.model.family.hf_keys(self.model.args)

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
    """`convert_model.py pp_to_hg --lora-adapter OUT`: a LoRA tag as a PEFT adapter dir."""
    src = Adapters(save_dir, tag)
    states = {idx: src.layer(idx) for idx in range(len(src.keys))}
    base = src.info["base"]
    hf = Path(base) / "hf"
    return write_peft(out, src.model.family, src.model.args, src.spec, {i: s for i, s in states.items() if s},
                      str(hf if hf.is_dir() else base))


def read_peft(adapter_dir: str | Path) -> tuple[L.LoraSpec, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter dir's spec and tensors (keys without the adapter-name infix)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = read_json(adapter_dir / ADAPTER_CONFIG, "PEFT adapter config")
    if cfg.get("peft_type") != "LORA":
        raise LayoutError(f"{adapter_dir / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}, only LORA is supported")
    spec = L.LoraSpec.of({"r": cfg["r"], "alpha": cfg.get("lora_alpha", 8), "dropout": cfg.get("lora_dropout", 0.0),
                          "target_modules": cfg.get("target_modules") or (), "modules_to_save": cfg.get("modules_to_save")})
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise LayoutError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    tensors = {k.replace(".default.", "."): v for k, v in load_file(adapter_dir / ADAPTER_WEIGHTS).items()}
    return spec, tensors
