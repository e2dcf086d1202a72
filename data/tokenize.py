"""Sample -> token ids and a per-token target mask (which tokens the model learns to produce).

Layout of one encoded sample (a "document"):
    [BOS] rendered text tokens [EOS]
- BOS is prepended when the tokenizer has one (context: nothing predicts it); if the rendered
  text already starts with it (a chat template that writes it), it is not added twice.
- Text tokens are target when they start inside a target segment (answers; all of pretrain).
- EOS follows the final answer and is a target (the model learns to stop). A chat template
  that writes EOS itself (as its end-of-turn) is trusted instead: no second EOS is added.
- With template="default" the sample text is literal: a "</s>" typed in the data stays text
  and never becomes a special token; a chat template's special tokens are parsed as such.
- Longer than max_seq_len: the tail is cut (the EOS and maybe part of the answer are lost) and
  the sample is counted as truncated; if no target token survives, it is dropped and counted.
Labels are derived from this later (data.dataset): labels[t] = ids[t+1] if target[t+1] else -100.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .samples import Sample
from .templates import Segment, render


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token: answers could not be terminated")
        pad = tokenizer.pad_token_id
        return cls(bos=tokenizer.bos_token_id, eos=eos, pad=eos if pad is None else pad)


@dataclass
class Encoded:
    ids: np.ndarray  # int64 [n]
    target: np.ndarray  # bool [n]
    truncated: bool

    @property
    def n_loss(self) -> int:
        """Tokens that carry loss once labels are shifted (the first token has no predictor)."""
        return int(self.target[1:].sum())


def encode_batch(samples: list[Sample], tokenizer, max_seq_len: int, template: str = "default",
                 special: SpecialIds | None = None) -> list[Encoded]:
    """Encode many samples with one tokenizer call (the fast tokenizer batches in Rust)."""
    special = special or SpecialIds.of(tokenizer)
    rendered = [render(s, template, tokenizer) for s in samples]
    texts = ["".join(seg.text for seg in segs) for segs in rendered]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=template == "default")
        pieces = [(np.asarray(ids, dtype=np.int64), _target_by_offsets(segs, offsets))
                  for segs, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"])]
    else:
        pieces = [_encode_by_segment(segs, tokenizer, template) for segs in rendered]
    return [_finish(ids, target, special, max_seq_len) for ids, target in pieces]


def encode(sample: Sample, tokenizer, max_seq_len: int, template: str = "default") -> Encoded:
    return encode_batch([sample], tokenizer, max_seq_len, template)[0]


def encode_prompt(text: str, tokenizer, template: str = "default") -> list[int]:
    """Token ids of a generation prompt (data.templates.render_prompt) with the training rules."""
    special = SpecialIds.of(tokenizer)
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=template == "default")["input_ids"]
    return ids if special.bos is None or (ids and ids[0] == special.bos) else [special.bos] + ids


def _target_by_offsets(segs: list[Segment], offsets) -> np.ndarray:
    """A token is target when its first character lies in a target segment."""
    bounds = np.cumsum([0] + [len(s.text) for s in segs])
    is_target = np.array([s.target for s in segs] + [False])
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    return is_target[np.searchsorted(bounds, starts, side="right") - 1]


def _encode_by_segment(segs: list[Segment], tokenizer, template: str) -> tuple[np.ndarray, np.ndarray]:
    """Slow tokenizers have no offsets: tokenize segment by segment."""
    ids, target = [], []
    for seg in segs:
        part = tokenizer(seg.text, add_special_tokens=False, split_special_tokens=template == "default")["input_ids"]
        ids += part
        target += [seg.target] * len(part)
    return np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=bool)


def _finish(ids: np.ndarray, target: np.ndarray, special: SpecialIds, max_seq_len: int) -> Encoded:
    if special.bos is not None and not (len(ids) and ids[0] == special.bos):
        ids, target = np.concatenate([[special.bos], ids]), np.concatenate([[False], target])
    if not (ids == special.eos).any():
        ids, target = np.concatenate([ids, [special.eos]]), np.concatenate([target, [True]])
    truncated = len(ids) > max_seq_len
    return Encoded(ids[:max_seq_len], target[:max_seq_len], truncated)
