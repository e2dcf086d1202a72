"""Tokenize a sample file once into an on-disk cache that every rank memory-maps.

One cache per input file, in `<cache_dir>/<key>/`, where the key hashes everything the tokens
depend on: the tokenizer (full backend definition, special ids, chat template), template,
max_seq_len, the file (absolute path, size, mtime), and this package's tokenization code.
Files:
    ids.bin      token ids of all documents back to back (uint16 when the vocab fits, else int32)
    target.bin   uint8 per token: 1 = the model learns to produce it
    offsets.npy  int64 [n_docs + 1]: document d is [offsets[d], offsets[d+1])
    n_loss.npy   int32 [n_docs]: loss tokens of each document once labels are shifted
    meta.json    dtype and stats (samples, skipped, truncated, dropped, first_error)
Concurrency: builders take a file lock per key (the other ranks of a node wait on it, then
load), and write into a temporary directory renamed into place when complete, so a crash or a
second node sharing the directory never exposes a half-written cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .reader import read_records
from .samples import SampleError, parse_sample
from .tokenize import SpecialIds, encode_batch

CACHE_VERSION = 1
BATCH_SIZE = 512  # samples per tokenizer call
_CODE_FILES = ("samples.py", "templates.py", "tokenize.py", "cache.py")


@dataclass
class FileCache:
    path: str
    ids: np.ndarray
    target: np.ndarray
    offsets: np.ndarray
    n_loss: np.ndarray
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.n_loss)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[d], self.offsets[d + 1]
        return self.ids[a:b].astype(np.int64), self.target[a:b].astype(bool)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _CODE_FILES)).hexdigest()


def cache_key(path: str, tokenizer_fp: str, template: str, max_seq_len: int) -> str:
    st = os.stat(path)
    parts = [CACHE_VERSION, _code_fingerprint(), tokenizer_fp, template, max_seq_len,
             os.path.abspath(path), st.st_size, st.st_mtime_ns]
    return Path(path).stem[:40] + "-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def load_or_build(path: str, tokenizer, max_seq_len: int, template: str, cache_dir: str | None,
                  skip_bad_samples: bool, tokenizer_fp: str | None = None) -> FileCache:
    """The file's cache, built by the first caller (per cache_dir) while the others wait."""
    from filelock import FileLock

    if cache_dir is None:  # no cache wanted: build in a scratch dir, keep it mapped, delete the names
        scratch = tempfile.mkdtemp(prefix="data-cache-")
        try:
            _build(path, tokenizer, max_seq_len, template, os.path.join(scratch, "c"), skip_bad_samples)
            return _load(path, os.path.join(scratch, "c"), skip_bad_samples)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(cache_dir, exist_ok=True)
    key = cache_key(path, tokenizer_fp or tokenizer_fingerprint(tokenizer), template, max_seq_len)
    final = os.path.join(cache_dir, key)
    with FileLock(final + ".lock"):
        if not os.path.exists(os.path.join(final, "meta.json")):
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                _build(path, tokenizer, max_seq_len, template, tmp, skip_bad_samples)
                try:
                    os.rename(tmp, final)
                except OSError:  # another node sharing the directory finished first
                    pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return _load(path, final, skip_bad_samples)


def _build(path: str, tokenizer, max_seq_len: int, template: str, out_dir: str, skip_bad_samples: bool):
    os.makedirs(out_dir)
    special = SpecialIds.of(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    stats = {"samples": 0, "skipped": 0, "truncated": 0, "dropped": 0, "first_error": None}
    offsets, n_loss = array("q", [0]), array("i")
    with open(os.path.join(out_dir, "ids.bin"), "wb") as ids_f, open(os.path.join(out_dir, "target.bin"), "wb") as tgt_f:
        def flush(batch):
            for enc in encode_batch(batch, tokenizer, max_seq_len, template, special):
                stats["truncated"] += enc.truncated
                if enc.n_loss == 0:  # truncation left no answer token: nothing to learn from it
                    stats["dropped"] += 1
                    continue
                enc.ids.astype(dtype).tofile(ids_f)
                enc.target.astype(np.uint8).tofile(tgt_f)
                offsets.append(offsets[-1] + len(enc.ids))
                n_loss.append(enc.n_loss)

        batch = []
        for index, record in read_records(path):
            try:
                if isinstance(record, SampleError):
                    raise record
                batch.append(parse_sample(record, path, index))
            except SampleError as e:
                if not skip_bad_samples:
                    raise
                stats["skipped"] += 1
                stats["first_error"] = stats["first_error"] or [e.file, e.index, e.field, e.problem]
                continue
            stats["samples"] += 1
            if len(batch) == BATCH_SIZE:
                flush(batch)
                batch = []
        flush(batch)
    np.save(os.path.join(out_dir, "offsets.npy"), np.frombuffer(offsets, dtype=np.int64))
    np.save(os.path.join(out_dir, "n_loss.npy"), np.frombuffer(n_loss, dtype=np.int32))
    meta = {"dtype": np.dtype(dtype).name, "stats": stats, "source": os.path.abspath(path), "template": template,
            "max_seq_len": max_seq_len}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _memmap(path: str, dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _load(path: str, cache: str, skip_bad_samples: bool) -> FileCache:
    with open(os.path.join(cache, "meta.json")) as f:
        meta = json.load(f)
    stats = meta["stats"]
    if stats["skipped"] and not skip_bad_samples:  # cache built by a skipping run: still an error here
        raise SampleError(*stats["first_error"])
    offsets = np.load(os.path.join(cache, "offsets.npy"), mmap_mode="r")
    return FileCache(path=path, ids=_memmap(os.path.join(cache, "ids.bin"), np.dtype(meta["dtype"])),
                     target=_memmap(os.path.join(cache, "target.bin"), np.uint8),
                     offsets=offsets,
                     n_loss=np.load(os.path.join(cache, "n_loss.npy"), mmap_mode="r" if len(offsets) > 1 else None),
                     stats=stats)
