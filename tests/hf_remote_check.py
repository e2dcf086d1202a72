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

from models.keymap import model_to_hf


def random_state(family, args, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (norm weights too, so a misplaced norm shows), in "<layer>.<param>" layout."""
    from models.pipeline import SequentialModel

    torch.manual_seed(seed)
    model = SequentialModel(family, args)
    return {k: torch.randn_like(v) * (v.shape[-1] ** -0.5 if v.dim() > 1 else 0.2) + (k.endswith("norm.weight"))
            for k, v in model.state_dict().items()}


def hf_state(family, args, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the public HF key names through family.hf_keys."""
    return model_to_hf(family, args, state)


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


def write_public_dir(family, hf_config: dict, state: dict[str, torch.Tensor], out: Path,
                     extra: dict[str, torch.Tensor] | None = None, shards: int = 2,
                     side_files: dict[str, str] | None = None) -> Path:
    """An HF dir laid out like the public checkpoints: config.json as published,
    pytorch_model-0000X-of-0000N.bin shards + index, a sentencepiece tokenizer, side files."""
    from tests.tokenizer_util import make_tokenizer

    args = family.Args.from_hf_config(hf_config)
    tensors = {**hf_state(family, args, state), **(extra or {})}
    keys = list(tensors)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = {k: tensors[k].clone() for k in keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]}
        out.mkdir(parents=True, exist_ok=True)
        torch.save(chunk, out / name)
        weight_map.update({k: name for k in chunk})
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    make_tokenizer(out)
    for name, text in (side_files or {}).items():
        (out / name).write_text(text)
    return out


def check_generate(model, ids: torch.Tensor, pad_id: int = 0, new: int = 6) -> None:
    """generate(): the KV-cache path equals recomputation, and a left-padded row equals its
    prompt alone (logits and greedy tokens)."""
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    with torch.no_grad():
        cached = model.generate(ids, **kw)
        assert cached.shape == (ids.shape[0], ids.shape[1] + new)
        assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))
        cut = 3
        short = ids[:1, cut:]
        batch = torch.cat([torch.cat([torch.full((1, cut), pad_id), short], 1), ids[1:2]])
        mask = torch.ones_like(batch)
        mask[0, :cut] = 0
        torch.testing.assert_close(model(input_ids=batch, attention_mask=mask).logits[0, cut:],
                                   model(input_ids=short).logits[0], atol=1e-5, rtol=0)
        both = model.generate(batch, attention_mask=mask, **kw)
        assert torch.equal(both[0, cut:], model.generate(short, **kw)[0])
        assert torch.equal(both[1], cached[1])


def round_trip(src: Path, tmp: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """hf_to_pp then pp_to_hg (several shards). Returns (HF output dir, the source's tensors,
    the pipeline checkpoint's state in "<layer>.<param>" layout)."""
    from engine.checkpoints.convert import hf_to_pp, pp_to_hg
    from engine.checkpoints.files import layer_file, load_layer

    hf_to_pp(src, tmp / "pp")
    out = pp_to_hg(tmp / "pp", tmp / "out", max_shard_bytes=64_000)
    source = {}
    for f in sorted(src.glob("pytorch_model-*.bin")):
        source.update(torch.load(f, weights_only=True))
    state, i = {}, 0
    while layer_file(tmp / "pp" / "global_step0", i).exists():
        state.update({f"{i}.{k}": v for k, v in load_layer(layer_file(tmp / "pp" / "global_step0", i)).items()})
        i += 1
    return out, source, state


def written_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out
