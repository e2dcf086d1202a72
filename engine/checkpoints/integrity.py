"""Content hashes of checkpoint files: computed while a file is written, checked before it is read.

Every file of a training tag is written through `save` (torch.save into a file object that
hashes each chunk on its way to the disk: no second pass over the bytes), and meta.json records
{file: size} and {file: hash}. Resume and pp_to_hg call `verify` on the files they are about to
read, so a bit flip, a zero-filled or truncated file is refused by name instead of loaded.
`check_dir` (convert_model.py verify) checks a whole checkpoint tag or an HF model dir without
loading a tensor.

xxh3-128 (the xxhash package, ~20 GB/s on one core: small next to the disk) when installed,
else zlib's crc32; meta.json names the algorithm, so either reads the other's checkpoints.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from engine.checkpoints import writes
from engine.checkpoints.files import INDEX_NAMES, LayoutError, check_safetensors, load_layer, read_json

try:
    import xxhash
except ImportError:  # requirements.txt installs it; crc32 keeps a bare environment working
    xxhash = None

CHUNK = 16 * 2**20


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


ALGO = "xxh3_128" if xxhash is not None else "crc32"


def new_hash(algo: str = ALGO):
    if algo == "crc32":
        return _Crc32()
    if algo == "xxh3_128" and xxhash is not None:
        return xxhash.xxh3_128()
    raise LayoutError(f"checksum algorithm {algo!r} is not available here (pip install xxhash)")


def available(algo: str) -> bool:
    return algo == "crc32" or (algo == "xxh3_128" and xxhash is not None)


class HashingFile:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, path: Path, algo: str = ALGO):
        self._fh = open(path, "wb")
        self.hash, self.size = new_hash(algo), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def save(obj, path: Path, algo: str = ALGO) -> tuple[int, str]:
    """torch.save `obj` to `path`; returns (size, hash) of the bytes written. A failed write
    raises (the OSError, e.g. ENOSPC, behind torch's error), or inside `writes.deferred()` is
    recorded for every rank to agree on (engine/checkpoints/writes.py)."""
    return writes.guarded(path, _save, obj, path, algo)


def _save(obj, path: Path, algo: str) -> tuple[int, str]:
    """The write itself.

    torch's zip writer computes a CRC-32 of every record (zlib speed, ~5 GB/s) that torch.load
    never checks; the hash here covers every byte of the file at ~5x that speed, so the CRC is
    switched off while writing: a hashed save is faster than a plain torch.save (README)."""
    out = HashingFile(path, algo)
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, out)
    finally:
        torch.serialization.set_crc32_options(crc)
        out.close()
    return out.size, out.hash.hexdigest()


def hash_file(path: Path, algo: str = ALGO) -> str:
    h, buf = new_hash(algo), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def verify(tag_dir: Path, meta: dict, rels=None) -> None:
    """Size and (when recorded) hash of the tag's files `rels` (default: all) against meta.json;
    the first bad one is a LayoutError naming it."""
    sizes, hashes, algo = meta.get("files", {}), meta.get("hashes") or {}, meta.get("hash", ALGO)
    for rel in sorted(sizes if rels is None else rels):
        path = tag_dir / rel
        if not path.is_file():
            raise LayoutError(f"{path}: missing from checkpoint {tag_dir.name} (damaged; remove the tag and point "
                              f"'latest' at an older one)")
        size = path.stat().st_size
        if rel in sizes and size != sizes[rel]:
            raise LayoutError(f"{path}: {size} bytes, the checkpoint recorded {sizes[rel]} (truncated or damaged)")
        if rel in hashes and available(algo):
            try:
                got = hash_file(path, algo)
            except OSError as e:  # permissions, an I/O error of the disk
                raise LayoutError(f"{path}: cannot be read ({e.strerror})") from None
            if got != hashes[rel]:
                raise LayoutError(f"{path}: checksum mismatch ({algo} {got}, meta.json recorded {hashes[rel]}): the "
                                  f"file is damaged; remove the tag and point 'latest' at an older one")


def has_hashes(meta: dict) -> bool:
    return bool(meta.get("hashes")) and available(meta.get("hash", ALGO))


def verify_weights(tag_dir: Path) -> None:
    """The layer files of a training tag (not its optimizer files) against its meta.json; a tag
    without one (hf_to_pp's global_step0, another tool's) has nothing recorded to check."""
    import sys

    meta_path = tag_dir / "meta.json"
    if not meta_path.is_file():
        return
    meta = read_json(meta_path, "checkpoint meta.json")
    verify(tag_dir, meta, [rel for rel in meta.get("files", {}) if rel.startswith("layer_")])
    if not has_hashes(meta):
        print(f"note: {tag_dir}: saved without checksums (by an older version): checked file sizes only",
              file=sys.stderr)


# ---------------------------------------------------------------------------- convert_model.py verify
def check_hf_dir(hf_dir: Path) -> str:
    """Every safetensors shard's header against its size, and the index against the shards."""
    shards = sorted(hf_dir.glob("*.safetensors"))
    tensors, holders, nbytes = {}, {}, {}  # tensor -> the shards holding it; shard -> its tensors, its bytes
    for f in shards:
        holders[f.name], nbytes[f.name] = set(), 0
        for key, info in check_safetensors(f).items():
            if key != "__metadata__":
                tensors.setdefault(key, []).append(f.name)
                holders[f.name].add(key)
                nbytes[f.name] += info["data_offsets"][1] - info["data_offsets"][0]
    total = sum(nbytes.values())
    index_path = next((hf_dir / n for n in INDEX_NAMES if (hf_dir / n).is_file()), None)
    if index_path is not None and index_path.name.endswith("safetensors.index.json"):
        index = read_json(index_path, "weight index")
        weight_map, metadata = index.get("weight_map"), index.get("metadata") or {}
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LayoutError(f"{index_path}: 'weight_map' must map tensor names to shard files")
        if not isinstance(metadata, dict):
            raise LayoutError(f"{index_path}: 'metadata' must be a JSON object, got {json.dumps(metadata)[:60]}")
        for key, fname in weight_map.items():
            if not (hf_dir / fname).is_file():
                raise LayoutError(f"{hf_dir / fname}: shard named by the index is missing")
            if key not in holders.get(fname, ()):
                raise LayoutError(f"{hf_dir / fname}: has no tensor '{key}' (the index says it does)")
        named = set(weight_map.values())  # other *.safetensors in the dir are not part of this model
        total = sum(nbytes.get(f, 0) for f in named)
        for fname in sorted(named):
            stray = next((k for k in sorted(holders.get(fname, ())) if weight_map.get(k) != fname), None)
            if stray is not None:
                where = f"lists it in {weight_map[stray]}" if stray in weight_map else "does not list it"
                raise LayoutError(f"{hf_dir / fname}: holds tensor '{stray}', the index {where} — the index and "
                                  "the shards are from different saves")
        want = metadata.get("total_size")
        try:
            want = None if want is None else int(want)
        except (TypeError, ValueError):
            raise LayoutError(f"{index_path}: metadata.total_size is {json.dumps(want)[:60]}, not a number") from None
        if want is not None and want != total:
            raise LayoutError(f"{index_path}: total_size {want}, the shards hold {total} bytes")
    elif index_path is None:
        dup = next(((k, fs) for k, fs in tensors.items() if len(fs) > 1), None)
        if dup is not None:
            raise LayoutError(f"{hf_dir / dup[1][1]}: tensor '{dup[0]}' is also in {dup[1][0]}, and no index says "
                              "which to use — remove the stray weight file")
    if not shards:
        n = _check_zips(hf_dir, "pytorch_model*.bin", "no weights found (*.safetensors or pytorch_model*.bin)")
        return f"ok: {hf_dir}: {n} .bin file(s), zip CRCs checked"
    return f"ok: {hf_dir}: {len(shards)} safetensors file(s), {len(tensors)} tensors, {total / 2**30:.2f} GiB"


def _check_zips(folder: Path, pattern: str, none_found: str) -> int:
    """_zip_crcs of every file matching `pattern` in `folder`; how many (none: LayoutError)."""
    files = sorted(folder.glob(pattern))
    if not files:
        raise LayoutError(f"{folder}: {none_found}")
    for f in files:
        _zip_crcs(f)
    return len(files)


def _zip_crcs(path: Path) -> None:
    """Files of tags without hashes (older versions, hf_to_pp) are torch.save zip archives with a
    CRC-32 per record: check them (no unpickling). A record stored with CRC 0 was written with
    torch's CRC switched off (our hashed files): nothing to check there."""
    import zipfile

    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise LayoutError(f"{path}: not a readable torch file ({e})") from None
    with z:
        for info in z.infolist():
            if info.CRC == 0:
                continue
            try:
                with z.open(info) as fh:  # reading to the end checks the record's CRC
                    while fh.read(CHUNK):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise LayoutError(f"{path}: checksum mismatch in record {info.filename} ({e})") from None


def _check_layer_contents(paths) -> None:
    """Files without a hash of ours (other tools, older versions) may hold anything torch.save
    wrote: each layer file must unpickle (weights-only, memory-mapped: tensor data is not read) to a
    dict of tensors by name, as pp_to_hg, demo.py and a resume will need it."""
    for path in sorted(paths):
        load_layer(path)


def check_tag(tag_dir: Path) -> str:
    """Every file of a training tag: present, its size, and its recorded hash (older tags without
    hashes: sizes, and the CRC-32s torch's zip format stores)."""
    meta_path = tag_dir / "meta.json"
    if not meta_path.is_file():  # a converted dir (hf_to_pp) or another tool's tag: layer files only
        n = _check_zips(tag_dir, "*.pt", "no layer files")
        _check_layer_contents(tag_dir.glob("layer_*.pt"))
        return f"ok: {tag_dir}: {n} files, no meta.json (zip CRCs and layer contents checked)"
    meta = read_json(meta_path, "checkpoint meta.json")
    verify(tag_dir, meta)
    extra = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                   if p.is_file() and p.name != "meta.json" and str(p.relative_to(tag_dir)) not in meta.get("files", {}))
    if extra:
        raise LayoutError(f"{tag_dir / extra[0]}: not in meta.json's file list (written after the checkpoint?)")
    files = meta.get("files", {})
    how = f"{meta.get('hash')} checked" if has_hashes(meta) else "sizes only (saved without checksums)"
    if not has_hashes(meta):
        for rel in files:
            if rel.endswith(".pt"):
                _zip_crcs(tag_dir / rel)
        _check_layer_contents(tag_dir / rel for rel in files if rel.startswith("layer_") and rel.endswith(".pt"))
        how += ", zip CRCs and layer contents checked"
    total = sum(files.values())
    return f"ok: {tag_dir}: {len(files)} files, {total / 2**30:.2f} GiB, {how}"


def check_dir(path: str | Path, tag: str | None = None) -> str:
    """convert_model.py verify: a pipeline checkpoint dir (the tag `latest` names, or `tag`) or an HF dir."""
    from engine.checkpoints.files import pipeline_layout, resolve_tag

    path = Path(path)
    if pipeline_layout(path) is not None or tag is not None:
        return check_tag(resolve_tag(path, tag))
    if (path / "config.json").is_file():
        return check_hf_dir(path)
    if not path.exists():
        raise LayoutError(f"{path}: does not exist")
    raise LayoutError(f"{path}: neither a pipeline checkpoint dir (no 'latest' file) nor an HF model dir (no config.json)")
