"""The on-disk layouts we read and write: HF model dirs and pipeline checkpoint dirs.

Pipeline checkpoint dir (compatible with DeepSpeed's pipeline checkpoints and gdGPT's):
    <dir>/latest                           the current tag (text)
    <dir>/<tag>/layer_XX-model_states.pt   one file per pipeline layer ("<param>": tensor)
    <dir>/hf/                              HF config.json, generation config, tokenizer files
Training adds engine/optimizer states and config.yml inside each tag.
"""
from __future__ import annotations

import errno
import json
import os
import reprlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class LayoutError(ValueError):
    """A missing or inconsistent file, phrased as one line naming it."""


def layer_file(tag_dir: str | Path, idx: int) -> Path:
    return Path(tag_dir) / f"layer_{idx:02d}-model_states.pt"


def find_layer_file(tag_dir: str | Path, idx: int) -> Path:
    """Layer idx's file as a reader finds it: ours, or DeepSpeed's name under a topology with a
    model (tensor-parallel) axis (Megatron-DeepSpeed: layer_XX-model_00-model_states.pt), which
    holds the whole layer only when that axis has one rank."""
    ours = layer_file(tag_dir, idx)
    if ours.exists() or ours.is_symlink():
        return ours
    tp = Path(tag_dir) / f"layer_{idx:02d}-model_00-model_states.pt"
    if tp.exists():
        if (Path(tag_dir) / f"layer_{idx:02d}-model_01-model_states.pt").exists():
            raise LayoutError(f"{tp.parent}: a tensor-parallel checkpoint (layer_{idx:02d}-model_00/-model_01 "
                              "files hold slices of one layer); merge it to one model-parallel rank first")
        return tp
    return ours


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file (UTF-8, BOM accepted); anything else is one LayoutError line."""
    if not path.is_file():
        raise LayoutError(f"{path}: {what} not found")
    try:
        raw = path.read_bytes()
    except OSError as e:  # permissions, an I/O error of the disk
        raise LayoutError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise LayoutError(f"{path}: line {line}: byte 0x{e.object[e.start]:02x} is not UTF-8 — damaged or "
                          "not a JSON file") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise LayoutError(f"{path}: nested too deeply to be a {what}") from None
    if not isinstance(data, dict):
        raise LayoutError(f"{path}: {what} must be a JSON object, got a {type(data).__name__}")
    return data


def read_hf_config(hf_dir: str | Path) -> dict:
    return read_json(Path(hf_dir) / "config.json", "HF config.json")


def resolve_tag(ckpt_dir: str | Path, tag: str | None = None) -> Path:
    """The tag dir to read: `tag` if given, else the one `latest` names."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.exists():
            raise LayoutError(f"{ckpt_dir}: not a pipeline checkpoint dir (no 'latest' file)")
        tag, named_by = _read_latest(latest), "'latest'"
    else:
        named_by = "--tag"
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or not tag.isprintable():
        raise LayoutError(f"{ckpt_dir / 'latest' if named_by != '--tag' else ckpt_dir}: {named_by} names {tag!r}, "
                          "not a checkpoint tag (a directory name such as global_step100)")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        found = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name != "hf"
                       and not p.name.startswith(".") and any(p.glob("layer_*model_states.pt")))
        have = f"; tags here: {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else ""
        raise LayoutError(f"{tag_dir}: checkpoint tag named by {named_by} does not exist{have}")
    return tag_dir


def current_tag(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names (checked as resolve_tag checks it), None when there is no `latest`."""
    latest = Path(ckpt_dir) / "latest"
    return _read_latest(latest) if latest.exists() else None


def _read_latest(latest: Path) -> str:
    """The tag in a `latest` file: one short line of text (DeepSpeed writes it without a newline;
    an editor may add CRLF, spaces or a BOM)."""
    if not latest.is_file():
        raise LayoutError(f"{latest}: should be a file holding the checkpoint tag, is a directory or special file")
    try:
        with open(latest, "rb") as fh:
            data = fh.read(4097)
    except OSError as e:
        raise LayoutError(f"{latest}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise LayoutError(f"{latest}: not a text file naming a checkpoint tag (damaged?); write the tag to "
                          "resume from into it, e.g. global_step100") from None
    if len(data) > 4096 or "\n" in text:
        raise LayoutError(f"{latest}: should hold one checkpoint tag, holds {len(text.splitlines())} lines")
    return text


def is_pipeline_dir(model_dir: str | Path) -> bool:
    """A dir of layer files under tags (ours, DeepSpeed's, gdGPT's training output): it has `latest`
    (anything by that name: a `latest` that is not a readable file is reported when it is read)."""
    return os.path.lexists(Path(model_dir) / "latest")


@dataclass(frozen=True)
class ModelDir:
    """A model dir as found on disk: where config + tokenizer are, and where the weights are."""

    path: Path
    hf_dir: Path  # config.json, tokenizer, generation config
    layers: Callable[[str | None], Path] | None = None  # tag -> dir of layer_XX files; None: HF weights in hf_dir
    gdgpt: bool = False  # the layer files hold HF-named tensors (gdGPT's layout, engine/checkpoints/gdgpt.py)

    @property
    def is_hf(self) -> bool:
        return self.layers is None


def _has_hf_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def _tag_has_layers(path: Path) -> bool:
    try:
        return any(resolve_tag(path).glob("layer_*model_states.pt"))
    except LayoutError:
        return False


def pipeline_layout(path: Path) -> ModelDir | None:
    if not is_pipeline_dir(path):
        return None
    hf = path / "hf" if (path / "hf" / "config.json").is_file() else path
    if hf == path and (path / "config.json").is_file() and _has_hf_weights(path) and not _tag_has_layers(path):
        return None  # an HF Trainer + DeepSpeed checkpoint-N dir: HF weights, `latest` naming only DeepSpeed's state
    return ModelDir(path, hf, lambda tag: resolve_tag(path, tag))


def _hf_layout(path: Path) -> ModelDir | None:
    if (path / "hf" / "config.json").is_file():  # config + tokenizer only (a save_path before its first tag)
        return ModelDir(path, path / "hf")
    return ModelDir(path, path) if (path / "config.json").is_file() else None


# Detectors tried in order; the first that recognises a dir wins. Another tool's checkpoint tree
# is supported by adding its detector here (everything that reads weights goes through `locate`).
LAYOUTS: list[Callable[[Path], ModelDir | None]] = [pipeline_layout, _hf_layout]


def locate(model_dir: str | Path) -> ModelDir:
    """What `model_dir` is: a pipeline checkpoint dir, an HF model dir, or another known layout."""
    path = Path(model_dir)
    for detect in LAYOUTS:
        found = detect(path)
        if found is not None:
            return found
    raise LayoutError(f"{path}: neither a pipeline checkpoint dir (no 'latest' file) nor an HF model dir "
                      f"(no config.json)")


def hf_dir_of(model_dir: str | Path) -> Path:
    """Where config + tokenizer live: <dir>/hf for a pipeline checkpoint, or an HF model dir itself."""
    return locate(model_dir).hf_dir


# bytes per element of each safetensors dtype (the format's spec)
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the library's own limit


def check_safetensors(path: Path) -> dict:
    """A safetensors file's header against the file (an interrupted download leaves a short or
    garbage file): 8-byte header length, a JSON header, every tensor's byte range inside the data,
    and the data as long as the header says. Reads only the header, and returns it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = fh.read(n) if 0 < n <= min(SAFETENSORS_MAX_HEADER, size - 8) else b""
    except OSError as e:
        raise LayoutError(f"{path}: cannot be read ({e.strerror})") from None

    def bad(what: str):
        raise LayoutError(f"{path}: {what} — not a complete safetensors file (interrupted download?)")

    if n < 0:
        bad(f"{size} bytes, shorter than the 8-byte header length")
    if not 0 < n <= SAFETENSORS_MAX_HEADER or n > size - 8:
        bad(f"header length {n} does not fit the file's {size} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        bad("header is not JSON")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    data, end_max = size - 8 - n, 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(t, dict) and t.get("dtype") in SAFETENSORS_DTYPES and isinstance(t.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in t["shape"]) and isinstance(t.get("data_offsets"), list)
              and len(t["data_offsets"]) == 2 and all(isinstance(o, int) for o in t["data_offsets"]))
        if not ok:
            bad(f"header entry for '{name}' is malformed")
        begin, end = t["data_offsets"]
        count = 1
        for d in t["shape"]:
            count *= d
        if not 0 <= begin <= end or end - begin != count * SAFETENSORS_DTYPES[t["dtype"]]:
            bad(f"'{name}': byte range {begin}..{end} does not hold {t['dtype']} {t['shape']}")
        end_max = max(end_max, end)
    if end_max != data:
        bad(f"header describes {end_max} bytes of tensor data, the file has {data}")
    return header


def load_layer(path: Path) -> dict[str, torch.Tensor]:
    """One layer file, memory-mapped (nothing is read until a tensor is used)."""
    if not path.is_file():
        what = ("is a broken symlink" if path.is_symlink() and not path.exists() else "is not a file"
                if path.exists() else "missing")
        if (path.parent / "mp_rank_00_model_states.pt").is_file() and not any(path.parent.glob("layer_*")):
            raise LayoutError(f"{path.parent}: a DeepSpeed checkpoint of a model trained without pipeline layers "
                              "(mp_rank_00_model_states.pt, no layer files); save it as an HF dir (save_pretrained, "
                              "or DeepSpeed's zero_to_fp32.py) and use that")
        raise LayoutError(f"{path}: layer file {what}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated / corrupt / not a torch file
        raise LayoutError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return check_tensor_dict(path, state)


def check_tensor_dict(path: Path, state, what: str = "tensors by parameter name", kind: str = "a layer file") -> dict:
    """`state` as a layer file must hold it: a dict of tensors by str name (a torch.save of a list,
    a tensor, None or a dict of other things is one line naming the file, not a TypeError later)."""
    def a(x) -> str:
        name = type(x).__name__
        return "None" if x is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"

    if not isinstance(state, dict):
        raise LayoutError(f"{path}: holds {a(state)}, not a dict of {what} — not {kind}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise LayoutError(f"{path}: key {reprlib.repr(key)} is {a(key)}, not a parameter name — not {kind}")
        if not isinstance(value, torch.Tensor):
            raise LayoutError(f"{path}: '{key}' holds {a(value)}, not a tensor — not {kind}")
    return state


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


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and dir under root to disk (so a rename publishes complete data)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: torch.save reports a failed write to a file object as a
    RuntimeError ('unexpected pos ...') whose context is the OSError the file raised."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _errno_text(e: OSError) -> str:
    return "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e)).lower()


class StagingDir:
    """Write a directory under a temporary name and publish it by rename only on success.

    `with StagingDir(out) as tmp:` — on any exception the temporary dir is removed and `out`
    is untouched; an existing `out` is refused rather than overwritten. The output disk refusing
    (full, read-only, I/O error, permissions) is one LayoutError line naming the file; any other
    exception passes through unchanged.
    """

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())):
            raise LayoutError(f"{self.final}: output already exists; choose a new path or remove it")
        blocked = next((p for p in self.final.absolute().parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise LayoutError(f"{self.final}: {blocked} is a file, not a directory; choose another output path")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as e:
            raise LayoutError(f"{self.final}: cannot create the output ({_errno_text(e)})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                fsync_tree(self.tmp)
                if self.final.is_dir():
                    self.final.rmdir()  # empty (checked on entry)
                os.replace(self.tmp, self.final)
                return False
            except OSError as e:
                exc = e
        shutil.rmtree(self.tmp, ignore_errors=True)
        failed = os_error_of(exc) if isinstance(exc, (OSError, RuntimeError)) else None
        if failed is None or isinstance(exc, LayoutError):
            return False
        try:
            free = f", {shutil.disk_usage(self.final.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = ""
        path = Path(os.fsdecode(failed.filename)) if failed.filename else None
        if path is not None and self.tmp not in path.parents and path != self.tmp:  # reading an input failed
            raise LayoutError(f"{path}: cannot be read ({_errno_text(failed)}); nothing was written to "
                              f"{self.final}") from None
        while_ = f" while writing {path.name}" if path is not None and path != self.tmp else ""
        raise LayoutError(f"{self.final}: {_errno_text(failed)}{while_}{free}; nothing was written there") from None
