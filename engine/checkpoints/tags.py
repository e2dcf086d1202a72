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
import time
from pathlib import Path

from engine import distributed as D
from engine import fault_hooks
from engine.checkpoints import reshape
from engine.config import TrainConfig, save_config
from engine.checkpoints.files import (LayoutError, check_layer, copy_hf_side_files, fsync_tree, is_pipeline_dir,
                                      layer_file, load_layer, resolve_tag, write_text_atomic)

META = "meta.json"  # {"family", "n_layers", "step", "layout", "files"}: refuse another model's or a damaged
#                     checkpoint; "layout" (pp, dp, parts, ZeRO stage, dtype) picks the reshape path


def tag_name(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> int:
    m = re.fullmatch(r"global_step(\d+)", tag)
    return int(m.group(1)) if m else -1


def has_checkpoint(save_path: str | Path) -> bool:
    return (Path(save_path) / "latest").is_file()


def layer_states(model_path: str | Path, family, args):
    """`idx -> (source path, {param: tensor})` for internal layer idx, from a pipeline checkpoint
    dir (its layer files, memory-mapped) or an HF model dir (only that layer's tensors are read)."""
    if is_pipeline_dir(model_path):
        tag_dir = resolve_tag(model_path)

        def layer_state(idx):
            path = layer_file(tag_dir, idx)
            return path, load_layer(path)
        return layer_state
    from engine.checkpoints.convert import HFWeights

    weights, keys = HFWeights(Path(model_path), getattr(family, "HF_BASE_PREFIX", "")), family.hf_keys(args)

    def hf_layer_state(idx):
        return Path(model_path), {ours: weights.get(theirs) for ours, theirs in keys[idx].items()}
    return hf_layer_state


def load_initial_weights(module, model_path: str | Path, family, args) -> None:
    """Load this stage's layers, checking keys and shapes first (see layer_states)."""
    layer_state = layer_states(model_path, family, args)
    for local_idx, layer in enumerate(module.forward_funcs):
        if not hasattr(layer, "state_dict"):
            continue
        path, state = layer_state(local_idx + module._local_start)
        check_layer(path, state, {k: v.shape for k, v in layer.state_dict().items()})
        layer.load_state_dict(state)
    module._synchronize_tied_weights()


def layout_of(cfg: TrainConfig, n_layers: int, kind: str = "pipeline") -> dict:
    """What DeepSpeed's own optimizer files depend on; any change needs the reshape path.
    `kind` is the training path: DeepSpeed's pipeline and ZeRO engines cannot load each other's
    files (pipeline layouts keep their old form, so existing checkpoints still match)."""
    from models.pipeline import balanced_parts

    parts = cfg.model_topo.parts if isinstance(cfg.model_topo.parts, list) else balanced_parts(n_layers, cfg.pipe_dim)
    layout = {"pp": cfg.pipe_dim, "dp": cfg.data_dim, "parts": list(parts), "zero_stage": cfg.zero_stage,
              "dtype": cfg.dtype}
    if kind == "pipeline" and cfg.bf16_grad_accum == "fp32":  # another DeepSpeed optimizer class and its files
        layout["grad_accum"] = "fp32"
    return layout if kind == "pipeline" else {**layout, "engine": kind}


def _shared_storage(root: Path, tmp: Path) -> bool:
    """Whether every node sees rank 0's files under save_path (one publisher) or each node has its
    own disk (one publisher per node, as with DeepSpeed's use_node_local_storage)."""
    import torch.distributed as tdist

    if D.world_size() == 1 or not tdist.is_initialized():
        return True
    nonce = [None]
    if D.rank() == 0:
        nonce[0] = f".probe-{os.getpid()}-{time.time_ns()}"
        (tmp / nonce[0]).write_text("")
    tdist.broadcast_object_list(nonce, src=0)
    seen = D.comm_tensor([int((tmp / nonce[0]).exists())])
    tdist.all_reduce(seen, op=tdist.ReduceOp.MIN)
    D.barrier()
    if D.rank() == 0:
        (tmp / nonce[0]).unlink()
    return bool(seen.item())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest(tag_dir: Path) -> dict[str, int]:
    """{relative path: size} of every file in a tag (meta.json itself excluded)."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != META}


def save(engine, cfg: TrainConfig, step: int, family_name: str, n_layers: int, hf_dir: Path, kind: str = "pipeline",
         write_weights=None) -> Path:
    """Save a complete, atomically published checkpoint tag for `step` (call on every rank).

    `write_weights(tmp_tag_dir, publisher)`, when given, is called on every rank after DeepSpeed's
    save to add the per-layer weight files DeepSpeed does not write itself (the ZeRO path).

    DeepSpeed writes `.tmp-<tag>/`; the publisher (global rank 0 on a shared filesystem, local
    rank 0 of each node on node-local disks) adds config.yml and meta.json (with a size manifest
    of every file), fsyncs the tree, renames it to `<tag>` and only then replaces `latest`.
    """
    root = Path(cfg.save_path)
    tag = tag_name(step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    D.barrier()
    if D.rank() == 0:
        tmp.mkdir(parents=True)
    D.barrier()
    publisher = D.rank() == 0 if _shared_storage(root, tmp) else int(os.environ.get("LOCAL_RANK", "0")) == 0
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    if write_weights is not None:
        write_weights(tmp, publisher)
    if cfg.reshape_state and kind == "pipeline":  # optim/ is written from pipeline engines only
        reshape.save(engine, tmp)
    layout = layout_of(cfg, n_layers, kind)
    D.barrier()
    if publisher and tmp.is_dir():
        fault_hooks.pause_in_save(root, step)  # test hook: a kill "while writing a checkpoint" made deterministic
        save_config(cfg, tmp / "config.yml")
        meta = {"family": family_name, "n_layers": n_layers, "step": step, "layout": layout, "files": manifest(tmp)}
        (tmp / META).write_text(json.dumps(meta))
        if not (root / "hf").is_dir():
            copy_hf_side_files(hf_dir, root / "hf")
        fsync_tree(tmp)
        stale = root / tag  # a tag `latest` never pointed at (crash between rename and `latest`)
        if stale.is_dir() and _latest(root) != tag:
            shutil.rmtree(stale)
        os.replace(tmp, root / tag)
        fsync_dir(root)
        write_text_atomic(root / "latest", tag)
        fsync_dir(root)
        rotate(root, cfg.keep_last)
    D.barrier()
    return root / tag


def _latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def rotate(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags; never the one `latest` names."""
    if keep_last <= 0:
        return
    current = _latest(root)
    newest = tag_step(current) if current else 10**18  # tags past `latest` are not ours to count or delete
    tags = sorted((p for p in root.iterdir() if p.is_dir() and 0 <= tag_step(p.name) <= newest),
                  key=lambda p: tag_step(p.name))
    for old in tags[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(root: Path, log) -> None:
    """Report and remove what a crash mid-save leaves: `.tmp-<tag>` dirs (never loaded: `latest`
    cannot name them) and half-written `latest` replacements. A tag renamed into place just before
    the crash (newer than `latest`) is kept until that step is saved again, which replaces it."""
    if not root.is_dir() or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    for p in sorted(root.glob(".tmp-*")):
        log(f"removing partial checkpoint {p} (interrupted while saving)")
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".latest.tmp-*"):
        p.unlink(missing_ok=True)


def _checked_meta(cfg: TrainConfig, family_name: str, n_layers: int) -> tuple[Path, dict]:
    tag_dir = resolve_tag(cfg.save_path)
    meta_path = tag_dir / META
    if not meta_path.is_file():
        raise LayoutError(f"{tag_dir}: not a training checkpoint of ours (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise LayoutError(f"{meta_path}: not valid JSON (damaged checkpoint)") from None
    if meta.get("family") != family_name or meta.get("n_layers") != n_layers:
        raise LayoutError(f"{tag_dir}: checkpoint of a {meta.get('family')} model with {meta.get('n_layers')} layers, "
                          f"but model_path is a {family_name} model with {n_layers}")
    for rel, size in meta.get("files", {}).items():
        f = tag_dir / rel
        if not f.is_file():
            raise LayoutError(f"{f}: missing from checkpoint {tag_dir.name} (damaged; remove the tag and point "
                              f"'latest' at an older one)")
        if f.stat().st_size != size:
            raise LayoutError(f"{f}: {f.stat().st_size} bytes, the checkpoint recorded {size} (truncated or damaged)")
    return tag_dir, meta


def layout_changed(cfg: TrainConfig, family_name: str, n_layers: int, kind: str = "pipeline") -> bool:
    """Whether the checkpoint `latest` names was saved on another pp x dp layout / parts / precision.

    Our optimizer copy (optim/) is written and read by pipeline engines only: a checkpoint of the
    other training path (pipeline <-> ZeRO) is refused here, before anything is built."""
    tag_dir, meta = _checked_meta(cfg, family_name, n_layers)
    saved = meta.get("layout")
    if saved in (None, layout_of(cfg, n_layers, kind)):
        return False
    if kind != "pipeline" or saved.get("engine", "pipeline") != "pipeline":
        raise LayoutError(f"{tag_dir}: saved by {saved.get('engine', 'pipeline')} training on {saved}; its optimizer "
                          f"state resumes only there. To go on from its weights with a fresh optimizer, set "
                          f"model_path: {cfg.save_path} and a new save_path")
    return True


def resume(engine, cfg: TrainConfig, family_name: str, n_layers: int, kind: str = "pipeline") -> int:
    """Load the checkpoint `latest` names into the engine; return the next step to run.

    Same layout: DeepSpeed's own load. Another layout (the weights were already loaded from the
    tag's layer files before the engine was built): optimizer state from the topology-free copy.
    """
    tag_dir, meta = _checked_meta(cfg, family_name, n_layers)
    if meta.get("layout") not in (None, layout_of(cfg, n_layers, kind)):  # pipeline only: see layout_changed
        reshape.load(engine, tag_dir)
        return int(meta["step"])
    path, client = engine.load_checkpoint(cfg.save_path, tag=tag_dir.name, load_module_strict=True)
    if path is None:
        raise LayoutError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    return int(client["step"])
