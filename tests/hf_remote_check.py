"""Helpers for families whose HF side is our own remote code (baichuan, chatglm).

A random state dict in our checkpoint layout, the same weights under the public HF key names,
and an HF model dir (config.json + our remote code + safetensors) loaded back through
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def random_state(family, args, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (norm weights too, so a misplaced norm shows), in "<layer>.<param>" layout."""
    from models.pipeline import SequentialModel

    torch.manual_seed(seed)
    model = SequentialModel(family, args)
    return {k: torch.randn_like(v) * (0.3 if v.dim() > 1 else 0.2) + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, v in model.state_dict().items()}


def hf_state(family, args, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the public HF key names through family.hf_keys."""
    out = {}
    for idx, names in enumerate(family.hf_keys(args)):
        for ours, theirs in names.items():
            out[theirs] = state[f"{idx}.{ours}"]
    return out


def write_hf_dir(family, hf_config: dict, state: dict[str, torch.Tensor], out: Path) -> Path:
    """An HF model dir as pp_to_hg writes it (exported config.json, remote code, safetensors)."""
    from safetensors.torch import save_file

    args = family.Args.from_hf_config(hf_config)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state(family, args, state).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(family.export_hf_config(dict(hf_config)), indent=2))
    for f in Path(family.REMOTE_CODE_DIR).glob("*.py"):
        shutil.copy2(f, out / f.name)
    return out


def load_remote(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32).eval()


def hf_forward(model, ids: torch.Tensor):
    """(loss, logits) of an HF causal LM: its own shifted mean cross-entropy."""
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return float(out.loss), out.logits
