"""Training checkpoints: crash-safe save, resume, initial weights.

Protocol (every tag): DeepSpeed writes into `<save>/.tmp-<tag>/`; once every rank is done,
the resolved config and our meta are added, the tree is fsynced and renamed to `<save>/<tag>/`,
and only then `latest` is replaced atomically. A crash at any point leaves `latest` naming a
complete tag; leftover `.tmp-*` dirs are reported and removed at the next start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from . import distributed as D
from .config import TrainConfig, save_config
from .layout import (LayoutError, check_layer, copy_hf_side_files, fsync_tree, is_pipeline_dir, layer_file, load_layer,
                     resolve_tag, write_text_atomic)

META = "meta.json"  # {"family", "n_layers", "step"}: lets resume refuse another model's checkpoint


def tag_name(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> int:
    m = re.fullmatch(r"global_step(\d+)", tag)
    return int(m.group(1)) if m else -1


def has_checkpoint(save_path: str | Path) -> bool:
    return (Path(save_path) / "latest").is_file()


def load_initial_weights(module, model_path: str | Path, family, args) -> None:
    """Load this stage's layers, checking keys and shapes first, from a pipeline checkpoint dir
    (its layer files) or straight from an HF model dir (only this stage's tensors are read)."""
    if is_pipeline_dir(model_path):
        tag_dir = resolve_tag(model_path)

        def layer_state(idx):
            path = layer_file(tag_dir, idx)
            return path, load_layer(path)
    else:
        from .convert import HFWeights

        weights, keys = HFWeights(Path(model_path), getattr(family, "HF_BASE_PREFIX", "")), family.hf_keys(args)

        def layer_state(idx):
            return Path(model_path), {ours: weights.get(theirs) for ours, theirs in keys[idx].items()}
    for local_idx, layer in enumerate(module.forward_funcs):
        if not hasattr(layer, "state_dict"):
            continue
        path, state = layer_state(local_idx + module._local_start)
        check_layer(path, state, {k: v.shape for k, v in layer.state_dict().items()})
        layer.load_state_dict(state)
    module._synchronize_tied_weights()


def save(engine, cfg: TrainConfig, step: int, family_name: str, n_layers: int, hf_dir: Path) -> Path:
    """Save a complete, atomically published checkpoint tag for `step` (call on every rank)."""
    root = Path(cfg.save_path)
    tag = tag_name(step)
    tmp_tag = f".tmp-{tag}"
    if D.rank() == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    D.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    D.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one publisher per node (save_path may be node-local)
        tmp = root / tmp_tag
        if tmp.is_dir():
            save_config(cfg, tmp / "config.yml")
            (tmp / META).write_text(json.dumps({"family": family_name, "n_layers": n_layers, "step": step}))
            if not (root / "hf").is_dir():
                copy_hf_side_files(hf_dir, root / "hf")
            fsync_tree(tmp)
            stale = root / tag  # a tag `latest` never pointed at (crash before it moved)
            if stale.is_dir():
                shutil.rmtree(stale)
            try:
                os.replace(tmp, root / tag)
            except FileNotFoundError:  # another node's publisher on a shared filesystem won the race
                pass
            write_text_atomic(root / "latest", tag)
            rotate(root, cfg.keep_last)
    D.barrier()
    return root / tag


def rotate(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags; never the one `latest` names."""
    if keep_last <= 0:
        return
    current = (root / "latest").read_text().strip()
    tags = sorted((p for p in root.iterdir() if p.is_dir() and tag_step(p.name) >= 0), key=lambda p: tag_step(p.name))
    for old in tags[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(root: Path, log) -> None:
    """Report and remove half-written tags left by a crash (never loaded: `latest` cannot name them)."""
    if not root.is_dir() or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    for p in sorted(root.glob(".tmp-*")):
        log(f"removing partial checkpoint {p} (interrupted while saving)")
        shutil.rmtree(p, ignore_errors=True)


def resume(engine, cfg: TrainConfig, family_name: str, n_layers: int) -> int:
    """Load the checkpoint `latest` names into the engine; return the next step to run."""
    tag_dir = resolve_tag(cfg.save_path)
    meta_path = tag_dir / META
    if not meta_path.is_file():
        raise LayoutError(f"{tag_dir}: not a training checkpoint of ours (no {META})")
    meta = json.loads(meta_path.read_text())
    if meta["family"] != family_name or meta["n_layers"] != n_layers:
        raise LayoutError(f"{tag_dir}: checkpoint of a {meta['family']} model with {meta['n_layers']} layers, "
                          f"but model_path is a {family_name} model with {n_layers}")
    path, client = engine.load_checkpoint(cfg.save_path, tag=tag_dir.name, load_module_strict=True)
    if path is None:
        raise LayoutError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    return int(client["step"])
