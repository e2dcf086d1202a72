"""Training checkpoints: crash-safe save and resume (initial weights: engine/checkpoints/weights.py).

Protocol (every tag): every rank writes its share of the tag's files (engine/checkpoints/reshape.py:
layer files holding the fp32 master, optim/ per layer, optim/common.pt) into `<save>/.tmp-<tag>/`,
hashing each file as it is written; once every rank is done the publisher adds the resolved
config and meta.json (size + hash of every file), fsyncs the tree, renames it to `<save>/<tag>/`,
and only then replaces `latest` atomically. A crash at any point leaves `latest` naming a
complete tag; leftover `.tmp-*` dirs are reported and removed at the next start. Resume checks
every file's size and hash (shared out over the ranks) before anything is loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from engine import distributed as D
from engine import fault_hooks
from engine.checkpoints import integrity, lora, reshape, writes
from engine.config import TrainConfig, save_config
from engine.checkpoints.files import (LayoutError, copy_hf_side_files, current_tag, fsync_dir, fsync_tree,
                                      is_pipeline_dir, read_json, resolve_tag, write_text_atomic)

META = "meta.json"  # {"format", "family", "n_layers", "step", "layout", "n_params", "files": {file: size},
#                     "hash": algorithm, "hashes": {file: hash}}: refuse another model's or a damaged checkpoint


def tag_name(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> int:
    m = re.fullmatch(r"global_step(\d+)", tag)
    return int(m.group(1)) if m else -1


def has_checkpoint(save_path: str | Path) -> bool:
    return is_pipeline_dir(save_path)


def layout_of(cfg: TrainConfig, n_layers: int, kind: str = "pipeline") -> dict:
    """The layout a tag was saved on (meta.json): informational for our files, which resume on any
    layout; an older tag without optim/ (DeepSpeed's own files) resumes only on the same one.
    `kind` is the training path (pipeline layouts keep their old form, so older tags still match)."""
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


def _manifest(tag_dir: Path, written: dict[str, list]) -> tuple[dict[str, int], dict[str, str]]:
    """{relative path: size} and {relative path: hash} of every file in a tag (meta.json excluded):
    the hashes the writers computed while writing, files written otherwise (config.yml) hashed here."""
    sizes, hashes = {}, {}
    for p in sorted(tag_dir.rglob("*")):
        if not p.is_file() or p.name == META:
            continue
        rel = str(p.relative_to(tag_dir))
        sizes[rel] = p.stat().st_size
        rec = written.get(rel)
        hashes[rel] = rec[1] if rec is not None and rec[0] == sizes[rel] else integrity.hash_file(p)
    return sizes, hashes


def _gather(written: dict[str, list]) -> dict[str, list]:
    import torch.distributed as tdist

    if D.world_size() == 1 or not tdist.is_initialized():
        return written
    parts = [None] * D.world_size()
    tdist.all_gather_object(parts, written)
    return {k: v for part in parts for k, v in part.items()}


def save(engine, cfg: TrainConfig, step: int, family_name: str, n_layers: int, hf_dir: Path, kind: str = "pipeline",
         log=None) -> Path:
    """Save a complete, atomically published checkpoint tag for `step` (call on every rank).

    Every rank writes its share into `.tmp-<tag>/` (reshape.save); the publisher (global rank 0
    on a shared filesystem, local rank 0 of each node on node-local disks) adds config.yml and
    meta.json (size and hash of every file), fsyncs the tree, renames it to `<tag>` and only then
    replaces `latest`. A failed write (disk full, I/O error) on any rank raises SaveFailed on
    every rank (engine/checkpoints/writes.py) with `latest` and the previous tags untouched and the
    partial `.tmp-<tag>` removed (or, after a crash, at the next start).
    `log(text)` (rank 0) gets one line: size, bytes per parameter and seconds.
    """
    t0 = time.perf_counter()
    root = Path(cfg.save_path)
    tag = tag_name(step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    D.barrier()
    note = writes.kept_note(root, tag)
    with writes.recorded(tmp):  # a full disk may refuse even the directory
        if D.rank() == 0:
            tmp.mkdir(parents=True)
    writes.agree(note=note)
    shared = _shared_storage(root, tmp)
    publisher = D.rank() == 0 if shared else int(os.environ.get("LOCAL_RANK", "0")) == 0
    with writes.deferred():  # a failed write (disk full) is raised by agree, on every rank, not mid-collective
        written = reshape.save(engine, tmp)
    writes.agree(lambda: publisher and writes.discard(root, tag), note)
    written = _gather(written)
    layout = layout_of(cfg, n_layers, kind)
    D.barrier()
    size = n_params = 0
    with writes.recorded(tmp):
        if publisher and tmp.is_dir():
            fault_hooks.pause_in_save(root, step)  # test hook: a kill "while writing a checkpoint" made deterministic
            save_config(cfg, tmp / "config.yml")
            files, hashes = _manifest(tmp, written)
            n_params = sum(rec[2] for rec in written.values())
            meta = {"format": reshape.FORMAT, "family": family_name, "n_layers": n_layers, "step": step,
                    "layout": layout, "n_params": n_params, "shared_storage": shared, "files": files,
                    "hash": integrity.ALGO, "hashes": hashes}
            if lora.record(cfg) is not None:  # adapters only: n_params counts the trainable parameters
                meta["lora"] = lora.record(cfg)
                meta["lora_hash"] = lora.digest(meta["lora"])  # the file hashes do not cover meta.json itself
            (tmp / META).write_text(json.dumps(meta))
            size = sum(files.values()) + (tmp / META).stat().st_size
            if not (root / "hf").is_dir():
                copy_hf_side_files(hf_dir, root / "hf")
            fsync_tree(tmp)
            stale = root / tag  # a tag `latest` never pointed at (crash between rename and `latest`)
            if stale.is_dir() and current_tag(root) != tag:
                shutil.rmtree(stale)
            os.replace(tmp, root / tag)
            fsync_dir(root)
            write_text_atomic(root / "latest", tag)
            fsync_dir(root)
            rotate(root, cfg.keep_last)
    writes.agree(lambda: publisher and writes.discard(root, tag), note)
    if D.rank() == 0 and n_params:
        per = "B/trainable param" if lora.record(cfg) is not None else "B/param"
        (log or print)(f"checkpoint {tag}: {size / 2**30:.2f} GiB, {size / n_params:.1f} {per}, "
                       f"{time.perf_counter() - t0:.1f}s")
    return root / tag


def rotate(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` tags; never the one `latest` names."""
    if keep_last <= 0:
        return
    current = current_tag(root)
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


_VERIFIED: set[tuple[str, str]] = set()  # (tag dir, meta.json text) already checked in this process


def _verify(tag_dir: Path, meta: dict, text: str) -> None:
    """Every file's size and hash before anything is loaded, hashed in parallel: each rank takes a
    share (of the files its node sees, on node-local disks); a bad file fails every rank with the
    same one-line error naming it."""
    import torch.distributed as tdist

    if (str(tag_dir), text) in _VERIFIED:
        return
    rels = sorted(meta.get("files", {}))
    dist = D.world_size() > 1 and tdist.is_initialized()
    if not dist:
        rank, world = 0, 1
    elif meta.get("shared_storage", True):
        rank, world = D.rank(), D.world_size()
    else:
        rank, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    error = None
    try:
        integrity.verify(tag_dir, meta, rels[rank::world])
    except LayoutError as e:
        error = str(e)
    if dist:
        errors = [None] * D.world_size()
        tdist.all_gather_object(errors, error)
        error = min((e for e in errors if e is not None), default=None)
    if error is not None:
        raise LayoutError(error)
    if not integrity.has_hashes(meta) and D.rank() == 0:
        print(f"note: {tag_dir}: saved without checksums (by an older version): checked file sizes only",
              file=sys.stderr)
    _VERIFIED.add((str(tag_dir), text))


def _checked_meta(cfg: TrainConfig, family_name: str, n_layers: int) -> tuple[Path, dict]:
    tag_dir = resolve_tag(cfg.save_path)
    meta_path = tag_dir / META
    if not meta_path.is_file():
        raise LayoutError(f"{tag_dir}: not a training checkpoint of ours (no {META})")
    meta = read_json(meta_path, "checkpoint meta.json")  # damaged, not an object, unreadable: one line
    text = json.dumps(meta, sort_keys=True)
    if meta.get("family") != family_name or meta.get("n_layers") != n_layers:
        raise LayoutError(f"{tag_dir}: checkpoint of a {meta.get('family')} model with {meta.get('n_layers')} layers, "
                          f"but model_path is a {family_name} model with {n_layers}")
    _verify(tag_dir, meta, text)
    return tag_dir, meta


def weights_from_tag(cfg: TrainConfig, family_name: str, n_layers: int, kind: str = "pipeline") -> bool:
    """Check the checkpoint `latest` names (every file's size and hash) and say where resuming
    takes the weights from: True: its layer files, before the engine is built (then `resume`
    sets the optimizer state: any pp x dp layout, parts, ZeRO stage, precision); False: an older
    tag without optim/, which DeepSpeed's own load restores on the layout that wrote it.

    Pipeline and ZeRO checkpoints do not resume each other: refused here, before anything is built."""
    tag_dir, meta = _checked_meta(cfg, family_name, n_layers)
    saved = meta.get("layout")
    if saved is not None and saved.get("engine", "pipeline") != kind:
        raise LayoutError(f"{tag_dir}: saved by {saved.get('engine', 'pipeline')} training on {saved}; its optimizer "
                          f"state resumes only there. To go on from its weights with a fresh optimizer, set "
                          f"model_path: {cfg.save_path} and a new save_path")
    lora.check_resume(tag_dir, lora.entry_of(tag_dir, meta), cfg)
    if reshape.has_state(tag_dir):
        return True
    if meta.get("format", 1) >= reshape.FORMAT or saved not in (None, layout_of(cfg, n_layers, kind)):
        raise LayoutError(f"{tag_dir}: has no topology-free optimizer state ({reshape.DIR}/{reshape.COMMON}); an "
                          f"older tag without it resumes only on the layout that wrote it ({saved})")
    return False


def resume(engine, cfg: TrainConfig, family_name: str, n_layers: int, kind: str = "pipeline") -> int:
    """Load the checkpoint `latest` names into the engine; return the next step to run.

    The weights were loaded from the tag's layer files before the engine was built (see
    weights_from_tag); the fp32 masters and optimizer state come from here. An older tag without
    optim/: DeepSpeed's own load of its own files, each read weights-only (engine/checkpoints/legacy.py).
    """
    tag_dir, meta = _checked_meta(cfg, family_name, n_layers)
    if reshape.has_state(tag_dir):
        reshape.load(engine, tag_dir)
        return int(meta["step"])
    from engine.checkpoints import legacy

    return legacy.load(engine, cfg.save_path, tag_dir)
