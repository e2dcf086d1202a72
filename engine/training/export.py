"""One command from an HF directory to a trained HF model: train, then export the final
checkpoint with pp_to_hg (rank 0, after every rank is done).

Re-running the same command resumes training from save_path; if training had finished it only
(re)does the export, and skips that too when OUT already holds a complete export of the same
checkpoint tag (the marker file `EXPORT_MARKER`, written inside the export before it is
published by rename, says which).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engine.checkpoints.files import LayoutError, resolve_tag

EXPORT_MARKER = "export_source.json"


def _marker(out: Path) -> dict | None:
    try:
        return json.loads((out / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_export_target(out: str | Path) -> None:
    """Refuse, before training, an OUT that holds something other than an earlier export."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _marker(out) is None)):
        raise LayoutError(f"--export-hf {out}: exists and is not an export of this command; choose a new path")
    blocked = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise LayoutError(f"--export-hf {out}: {blocked} is a file, not a directory; choose a new path")


def export_hf(save_path: str | Path, out: str | Path, log=print) -> Path:
    """pp_to_hg of save_path's latest tag into `out`, unless `out` already holds exactly that."""
    from engine.checkpoints.convert import pp_to_hg

    save_path, out = Path(save_path).resolve(), Path(out)
    tag = resolve_tag(save_path).name
    want = {"source": str(save_path), "tag": tag}
    if _marker(out) == want:
        log(f"export: {out} already holds {tag} of {save_path}; skipped")
        return out
    check_export_target(out)
    for stale in out.parent.glob(f".{out.name}.export-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    pp_to_hg(save_path, tmp, tag, merge_lora=True)  # LoRA: base + adapters merged; a disk that refuses is one line
    old = out.with_name(f".{out.name}.export-old-{os.getpid()}")
    try:
        (tmp / EXPORT_MARKER).write_text(json.dumps(want, indent=2))
        if out.exists():
            os.replace(out, old)  # an earlier tag's export
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise LayoutError(f"--export-hf {out}: {e.strerror.lower() if e.strerror else e} while publishing the "
                          f"export; the checkpoint {tag} is intact: free space and run the same command") from None
    shutil.rmtree(old, ignore_errors=True)
    log(f"export: {tag} of {save_path} -> {out} (HF format)")
    return out


def train_and_export(cfg, train_fn, out: str | Path | None):
    """train_fn(cfg), then (all ranks at a barrier) rank 0 exports to `out`."""
    from engine import distributed as D

    if out is not None and D.rank() == 0:
        check_export_target(out)
    result = train_fn(cfg)
    if out is None or result.interrupted:
        return result
    D.barrier()
    if D.rank() == 0:
        export_hf(cfg.save_path, out)
    D.barrier()
    return result
