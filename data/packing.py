"""Assign documents to fixed-length rows, and lay a row out for the model.

Row layout (what models/masks.py expects): documents back to back, position ids restarting
at 0 for each (the model numbers documents by position_ids == 0 and masks attention across
them), then padding that forms its own "document" (positions 0, 1, ... so it never attends into
real text). Labels: labels[t] = ids[t+1] when token t+1 is a target of the same document, else
-100, so nothing predicts across a document boundary or into padding.
"""
from __future__ import annotations

import bisect

import numpy as np

IGNORE = -100


def pack_rows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing bin packing of documents into rows of `capacity` tokens.

    Returns CSR form: row r holds documents order[row_ptr[r]:row_ptr[r+1]]. Deterministic for
    given lengths (a stable sort; ties keep input order, so shuffle the input to mix sources).
    O(n log capacity): open rows are bucketed by remaining space.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"document lengths must be in [1, {capacity}]")
    by_size = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct remaining capacities of open rows
    rows_with_free: dict[int, list[int]] = {}  # remaining capacity -> open row ids
    for doc in by_size.tolist():
        n = int(lengths[doc])
        k = bisect.bisect_left(free_sizes, n)
        if k == len(free_sizes):
            row, free = len(rows), capacity
            rows.append([])
        else:
            free = free_sizes[k]
            bucket = rows_with_free[free]
            row = bucket.pop()
            if not bucket:
                del rows_with_free[free]
                free_sizes.pop(k)
        rows[row].append(doc)
        left = free - n
        if left > 0:
            if left not in rows_with_free:
                rows_with_free[left] = []
                bisect.insort(free_sizes, left)
            rows_with_free[left].append(row)
    row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_ptr[1:])
    order = np.fromiter((d for r in rows for d in r), dtype=np.int64, count=int(row_ptr[-1]))
    return row_ptr, order


def layout_row(docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """input_ids, labels (shifted), position_ids of one row from its (ids, target) documents."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    position_ids = np.empty(seq_len, dtype=np.int64)
    at = 0
    for ids, target in docs:
        n = len(ids)
        input_ids[at:at + n] = ids
        labels[at:at + n - 1] = np.where(target[1:], ids[1:], IGNORE)
        position_ids[at:at + n] = np.arange(n)
        at += n
    position_ids[at:] = np.arange(seq_len - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
