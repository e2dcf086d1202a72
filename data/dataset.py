"""Sample files -> fixed-length rows ready for the model (see data.packing for the row layout).

Mixing weights: `weights[f]` multiplies how often file f's samples appear in one epoch: the
file contributes round(w * n_f) samples: every sample floor(w) times, plus a fixed random
subset (chosen by `seed`) of round((w - floor(w)) * n_f) samples once more. So 1 = as is,
2 = every sample twice, 0.5 = a random half, 0 = file unused. The selection is made once per
build (the same in every epoch); the loader then reshuffles rows every epoch.

Rows: packing=False puts one sample per row (padded); packing=True fills rows with several
samples (best-fit decreasing), which wastes far fewer tokens on padding. Rows reference the
memory-mapped cache, so a large corpus is not held in RAM on any rank.
"""
from __future__ import annotations

import os

import numpy as np

from .cache import FileCache, load_or_build, tokenizer_fingerprint
from .packing import layout_row, pack_rows
from .templates import resolve_template
from .tokenize import SpecialIds


class TokenDataset:
    """Fixed-length rows: __getitem__ gives int64 input_ids, labels (shifted), position_ids."""

    def __init__(self, caches: list[FileCache], doc_file: np.ndarray, doc_index: np.ndarray, row_ptr: np.ndarray,
                 row_docs: np.ndarray, max_seq_len: int, pad_id: int):
        self.caches, self.doc_file, self.doc_index = caches, doc_file, doc_index
        self.row_ptr, self.row_docs = row_ptr, row_docs
        self.max_seq_len, self.pad_id = max_seq_len, pad_id
        self.n_tokens = _row_sums(per_doc(caches, "lengths", doc_file, doc_index)[row_docs], row_ptr)
        self.n_loss_tokens = _row_sums(per_doc(caches, "n_loss", doc_file, doc_index)[row_docs], row_ptr)
        self.stats = self._stats()

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        docs = self.row_docs[self.row_ptr[i]:self.row_ptr[i + 1]]
        return layout_row([self.caches[self.doc_file[d]].doc(self.doc_index[d]) for d in docs], self.max_seq_len,
                          self.pad_id)

    def _stats(self) -> dict:
        per_file = [{"path": c.path, **{k: v for k, v in c.stats.items() if k != "first_error"}} for c in self.caches]
        totals = {k: sum(s[k] for s in per_file) for k in ("samples", "skipped", "truncated", "dropped")}
        real = int(self.n_tokens.sum())
        return {**totals, "docs": len(self.doc_file), "rows": len(self), "tokens": real,
                "loss_tokens": int(self.n_loss_tokens.sum()),
                "padding": 1 - real / max(1, len(self) * self.max_seq_len), "files": per_file}


def per_doc(caches: list[FileCache], attr: str, doc_file: np.ndarray, doc_index: np.ndarray) -> np.ndarray:
    """A per-document cache array (lengths, n_loss) gathered for the selected documents."""
    values = np.concatenate([np.asarray(getattr(c, attr), dtype=np.int64) for c in caches])
    file_start = np.cumsum([0] + [len(c) for c in caches])[:-1]
    return values[file_start[doc_file] + doc_index]


def _row_sums(values: np.ndarray, row_ptr: np.ndarray) -> np.ndarray:
    csum = np.concatenate([[0], np.cumsum(values)])
    return (csum[row_ptr[1:]] - csum[row_ptr[:-1]]).astype(np.int64)


def select_docs(sizes: list[int], weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(file, doc index) of every sample in one epoch under the mixing weights (module doc)."""
    files, docs = [], []
    for f, (n, w) in enumerate(zip(sizes, weights)):
        if w < 0:
            raise ValueError(f"weights[{f}] = {w}: mixing weights must be >= 0")
        whole, extra = int(w), round((w - int(w)) * n)
        rng = np.random.default_rng([seed, f])
        chosen = [np.arange(n)] * whole + [np.sort(rng.choice(n, size=extra, replace=False))]
        picked = np.concatenate(chosen).astype(np.int64)
        files.append(np.full(len(picked), f, dtype=np.int32))
        docs.append(picked)
    return np.concatenate(files), np.concatenate(docs)


def build_dataset(paths: list[str], tokenizer, max_seq_len: int, *, weights: list[float] | None = None,
                  packing: bool = False, skip_bad_samples: bool = False, template: str = "default",
                  cache_dir: str | None = None, seed: int = 0, num_workers: int | None = None) -> TokenDataset:
    """Read, validate, tokenize (cached) and arrange sample files into fixed-length rows.

    Call it on every rank: with a shared `cache_dir` one process per directory tokenizes each
    file while the others wait, then all memory-map the result. num_workers: tokenizing
    processes for large files (default: the CPUs this process may use, at most 16).
    cache_dir=None tokenizes into a scratch cache that is deleted once mapped (tests, small data).
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("no data files given")
    template = resolve_template(template, tokenizer)  # 'auto' -> the concrete choice, which keys the cache
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} data files")
    fingerprint = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    if num_workers is None:
        num_workers = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    caches = [load_or_build(p, tokenizer, max_seq_len, template, cache_dir, skip_bad_samples, fingerprint, num_workers)
              for p in paths]
    doc_file, doc_index = select_docs([len(c) for c in caches], weights, seed)
    if packing:
        # shuffle first: packing keeps input order among equal lengths, and rows should mix sources
        # (stream [seed, len(paths)] is disjoint from select_docs' per-file streams [seed, f])
        mix = np.random.default_rng([seed, len(paths)]).permutation(len(doc_file))
        doc_file, doc_index = doc_file[mix], doc_index[mix]
        row_ptr, row_docs = pack_rows(per_doc(caches, "lengths", doc_file, doc_index), max_seq_len)
    else:
        row_ptr, row_docs = np.arange(len(doc_file) + 1), np.arange(len(doc_file))
    return TokenDataset(caches, doc_file, doc_index, row_ptr, row_docs, max_seq_len, SpecialIds.of(tokenizer).pad)
