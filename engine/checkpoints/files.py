"""The on-disk layouts we read and write: HF model dirs and pipeline checkpoint dirs.

Pipeline checkpoint dir (compatible with DeepSpeed's pipeline checkpoints and gdGPT's):
    <dir>/latest                           the current tag (text)
    <dir>/<tag>/layer_XX-model_states.pt   one file per pipeline layer ("<param>": tensor)
    <dir>/hf/                              HF config.json, generation config, tokenizer files
Training adds engine/optimizer states and config.yml inside each tag.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class LayoutError(ValueError):
    """A missing or inconsistent file, phrased as one line naming it."""


def layer_file(tag_dir: str | Path, idx: int) -> Path:
    return Path(tag_dir) / f"layer_{idx:02d}-model_states.pt"


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise LayoutError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_hf_config(hf_dir: str | Path) -> dict:
    return read_json(Path(hf_dir) / "config.json", "HF config.json")


def resolve_tag(ckpt_dir: str | Path, tag: str | None = None) -> Path:
    """The tag dir to read: `tag` if given, else the one `latest` names."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise LayoutError(f"{ckpt_dir}: not a pipeline checkpoint dir (no 'latest' file)")
        tag = latest.read_text().strip()
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise LayoutError(f"{tag_dir}: checkpoint tag named by 'latest' does not exist")
    return tag_dir


def hf_dir_of(model_dir: str | Path) -> Path:
    """Where config + tokenizer live: <dir>/hf for a pipeline checkpoint, or an HF model dir itself."""
    for hf in (Path(model_dir) / "hf", Path(model_dir)):
        if (hf / "config.json").is_file():
            return hf
    raise LayoutError(f"{model_dir}: neither a pipeline checkpoint (hf/config.json) nor an HF model dir (config.json)")


def is_pipeline_dir(model_dir: str | Path) -> bool:
    return (Path(model_dir) / "latest").is_file()


def load_layer(path: Path) -> dict[str, torch.Tensor]:
    """One layer file, memory-mapped (nothing is read until a tensor is used)."""
    if not path.is_file():
        raise LayoutError(f"{path}: layer file missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated / corrupt / not a torch file
        raise LayoutError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def check_layer(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """The keys and shapes of a layer file against what the model expects."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'"
        raise LayoutError(f"{path}: {what} — checkpoint is from another model or family")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise LayoutError(f"{path}: '{key}' has shape {list(state[key].shape)}, the model expects "
                              f"{list(shape)} — checkpoint is from another model")


def copy_hf_side_files(src: Path, dst: Path) -> None:
    """Copy config, generation config, tokenizer and remote-code files (everything but weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in INDEX_NAMES:
            shutil.copy2(f, dst / f.name)


def fsync_tree(root: Path) -> None:
    """Flush every file and dir under root to disk (so a rename publishes complete data)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class StagingDir:
    """Write a directory under a temporary name and publish it by rename only on success.

    `with StagingDir(out) as tmp:` — on any exception the temporary dir is removed and `out`
    is untouched; an existing `out` is refused rather than overwritten.
    """

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())):
            raise LayoutError(f"{self.final}: output already exists; choose a new path or remove it")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        fsync_tree(self.tmp)
        if self.final.is_dir():
            self.final.rmdir()  # empty (checked on entry)
        os.replace(self.tmp, self.final)
        return False
