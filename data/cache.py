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

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .reader import read_records
from .samples import SampleError, parse_sample
from .tokenize import SpecialIds, encode_batch

CACHE_VERSION = 1
CHUNK_SIZE = 512  # samples per tokenizer call / per worker task
POOL_AFTER_CHUNKS = 8  # smaller files are encoded in-process: forking workers would cost more
_CODE_FILES = ("reader.py", "samples.py", "templates.py", "tokenize.py", "cache.py")


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
    if backend is not None:  # canonical JSON: the same tokenizer hashes alike in every process
        h.update(json.dumps(json.loads(backend.to_str()), sort_keys=True).encode())
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
                  skip_bad_samples: bool, tokenizer_fp: str | None = None, num_workers: int = 1) -> FileCache:
    """The file's cache, built by the first caller (per cache_dir) while the others wait."""
    from filelock import FileLock

    if cache_dir is None:  # no cache wanted: build in a scratch dir, keep it mapped, delete the names
        scratch = tempfile.mkdtemp(prefix="data-cache-")
        try:
            _build(path, tokenizer, max_seq_len, template, os.path.join(scratch, "c"), skip_bad_samples, num_workers)
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
                _build(path, tokenizer, max_seq_len, template, tmp, skip_bad_samples, num_workers)
                try:
                    os.rename(tmp, final)
                except OSError:  # another node sharing the directory finished first
                    pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return _load(path, final, skip_bad_samples)


@dataclass(frozen=True)
class _Job:
    """What a (worker) process needs to encode chunks of one file."""
    path: str
    tokenizer: object
    max_seq_len: int
    template: str
    skip_bad_samples: bool
    dtype: type


@dataclass
class _Chunk:
    """Encoded samples of one chunk, ready to append to the cache files."""
    ids: np.ndarray
    target: np.ndarray
    lengths: np.ndarray
    n_loss: np.ndarray
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    errors: list = field(default_factory=list)  # [file, index, field, problem, line] of skipped samples


def _encode_chunk(job: _Job, records: list[tuple[int, object]]) -> _Chunk:
    samples, errors = [], []
    for index, record, line in records:
        try:
            if isinstance(record, SampleError):
                raise record
            samples.append(parse_sample(record, job.path, index, line=line))
        except SampleError as e:
            if not job.skip_bad_samples:
                raise
            errors.append([e.file, e.index, e.field, e.problem, e.line])
    encoded = encode_batch(samples, job.tokenizer, job.max_seq_len, job.template) if samples else []
    kept = [e for e in encoded if e.n_loss > 0]  # truncation left no answer token: nothing to learn from it
    cat = lambda arrays, dtype: np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)  # noqa: E731
    return _Chunk(ids=cat([e.ids for e in kept], job.dtype), target=cat([e.target for e in kept], np.uint8),
                  lengths=np.array([len(e.ids) for e in kept], dtype=np.int64),
                  n_loss=np.array([e.n_loss for e in kept], dtype=np.int32), samples=len(samples),
                  truncated=sum(e.truncated for e in encoded), dropped=len(encoded) - len(kept), errors=errors)


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job):
    global _WORKER_JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the pool is the parallelism
    _WORKER_JOB = job


def _encode_in_worker(records):
    return _encode_chunk(_WORKER_JOB, records)


def _chunks(path: str):
    chunk = []
    for item in read_records(path, lines=True):
        chunk.append(item)
        if len(chunk) == CHUNK_SIZE:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded_chunks(job: _Job, num_workers: int):
    """Encoded chunks in file order; with workers, a bounded number in flight (a 10 GB file is
    never queued whole). The pool starts only once the file proves larger than a few chunks.
    Workers are forked, as torch's DataLoader does: they run only Python and a single-threaded
    tokenizer (a fork server would re-import torch/transformers per worker: ~10 s here)."""
    chunks = _chunks(job.path)
    head = list(itertools.islice(chunks, POOL_AFTER_CHUNKS))
    if num_workers <= 1 or len(head) < POOL_AFTER_CHUNKS:
        for chunk in itertools.chain(head, chunks):
            yield _encode_chunk(job, chunk)
        return
    with multiprocessing.get_context("fork").Pool(num_workers, _init_worker, (job,)) as pool:
        pending = collections.deque()
        for chunk in itertools.chain(head, chunks):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _build(path: str, tokenizer, max_seq_len: int, template: str, out_dir: str, skip_bad_samples: bool,
           num_workers: int = 1):
    os.makedirs(out_dir)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    SpecialIds.of(tokenizer)  # fail before forking workers when the tokenizer cannot terminate answers
    job = _Job(path, tokenizer, max_seq_len, template, skip_bad_samples, dtype)
    stats = {"samples": 0, "skipped": 0, "truncated": 0, "dropped": 0, "first_error": None}
    lengths, n_loss = [], []
    with open(os.path.join(out_dir, "ids.bin"), "wb") as ids_f, \
            open(os.path.join(out_dir, "target.bin"), "wb") as tgt_f:
        for chunk in _encoded_chunks(job, num_workers):
            chunk.ids.tofile(ids_f)
            chunk.target.tofile(tgt_f)
            lengths.append(chunk.lengths)
            n_loss.append(chunk.n_loss)
            for key in ("samples", "truncated", "dropped"):
                stats[key] += getattr(chunk, key)
            stats["skipped"] += len(chunk.errors)
            stats["first_error"] = stats["first_error"] or (chunk.errors[0] if chunk.errors else None)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths else [])]).astype(np.int64)
    np.save(os.path.join(out_dir, "offsets.npy"), offsets)
    np.save(os.path.join(out_dir, "n_loss.npy"), np.concatenate(n_loss) if n_loss else np.zeros(0, np.int32))
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
