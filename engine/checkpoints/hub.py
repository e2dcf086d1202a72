"""Hub ids where a model dir is expected (gdGPT's `--input-path bigscience/bloomz-7b1-mt`), through
huggingface_hub: its cache first, a download when online, one clear line when neither works.

The cache is huggingface_hub's own (HF_HUB_CACHE / HF_HOME; models--org--name/snapshots/<rev>/),
read again at each call so a caller's environment is honoured; HF_HUB_OFFLINE=1 never touches
the network (without it an unreachable hub costs huggingface_hub's retries, then the cache).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from engine.checkpoints.files import LayoutError

# what a model needs: configs, tokenizer, remote code; weights as safetensors, else .bin
SIDE_FILES = ["*.json", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja", "tokenizer*"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ
                                             else None)


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.match(name)) and ".." not in name


def fetch(repo_id: str, local_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """The snapshot dir of `repo_id` from the cache, downloaded when not there and the hub is
    reachable; with `local_dir`, that dir filled with it. Safetensors weights when the repo has
    them, else .bin."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, \
        RevisionNotFoundError

    out = Path(local_dir) if local_dir is not None else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LayoutError(f"{out}: already exists and is not empty; choose a new --save-path")
    kw = dict(repo_id=repo_id, revision=revision, cache_dir=_cache_dir())
    try:
        if out is not None and not _offline():
            try:
                return _snapshot(local_dir=out, **kw)
            except LocalEntryNotFoundError:
                pass  # the hub cannot be reached: a cached copy, below
        path = _snapshot(local_files_only=_offline() or out is not None, **kw)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise LayoutError(f"{repo_id}: no such model on the HF hub, or gated / private (log in with `hf auth login`): "
                          f"{type(e).__name__}") from None
    except LocalEntryNotFoundError:
        where = _cache_dir() or "the default HF cache"
        how = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        raise LayoutError(f"{repo_id}: not a local dir and not in {where}, and {how}: download it where there is "
                          f"network (python convert_model.py download --model-name {repo_id} --save-path DIR) and "
                          "pass DIR") from None
    if out is None:
        return path
    shutil.copytree(path, out, dirs_exist_ok=True)  # follows the cache's blob symlinks: real files
    return out


def _snapshot(**kw) -> Path:
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(allow_patterns=SIDE_FILES + ["*.safetensors"], **kw))
    if not any(path.glob("*.safetensors")):  # an older repo: PyTorch .bin shards instead
        path = Path(snapshot_download(allow_patterns=SIDE_FILES + ["*.bin"], **kw))
    return path


def model_source(name: str | Path) -> Path:
    """A local dir as it is; otherwise a hub id, resolved by `fetch`."""
    path = Path(name)
    if path.exists() or not is_repo_id(str(name)):
        return path
    return fetch(str(name))
