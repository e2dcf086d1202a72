"""Sample -> token ids and a per-token target mask (which tokens the model learns to produce).

Layout of one encoded sample (a "document"):
    [BOS] rendered text tokens [EOS]
- Plain layouts (template "default"; pretrain samples always): BOS is prepended when the
  tokenizer adds one itself (its own `tokenizer(text)` starts with BOS: llama's sentencepiece
  does, GPT-2-style BPE does not), never anywhere else. The sample text is literal: a "</s>" typed
  in the data stays text and never becomes a special token. EOS follows the final answer and is
  a target (the model learns to stop).
- Chat template: its text is tokenized as is (its special tokens parsed as such) and trusted
  for both ends: it writes BOS itself when it wants one, and each assistant turn ends with the
  template's end-of-turn token, which is the target that teaches stopping; no BOS or EOS is
  added (EOS only for a template without an end-of-turn token).
- Text tokens are target when they start inside a target segment (answers; all of pretrain).
- gdGPT's layout (template "gdgpt"): each piece tokenized on its own, special tokens parsed,
  no BOS (gdGPT never added one); its pieces write EOS after each answer, so only pretrain gets
  one appended.
- Longer than max_seq_len: the tail is cut (the EOS and maybe part of the answer are lost) and
  the sample is counted as truncated; if no target token survives, it is dropped and counted.
Labels are derived from this later (data.dataset): labels[t] = ids[t+1] if target[t+1] else -100.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .samples import Sample
from .gdgpt_template import prompt_pieces as gdgpt_prompt_pieces
from .templates import Segment, chat_style, gdgpt_eos, render, render_prompt, resolve_template, uses_chat_template


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None  # None: no BOS is ever added (the tokenizer has none or does not add it itself)
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token: answers could not be terminated")
        pad = tokenizer.pad_token_id
        bos = tokenizer.bos_token_id
        if bos is not None and tokenizer("a")["input_ids"][:1] != [bos]:
            bos = None  # e.g. SmolLM2's bos <|im_start|>: the tokenizer never adds it, neither do we
        return cls(bos=bos, eos=eos, pad=eos if pad is None else pad)


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
    """Encode many samples with one tokenizer call per kind of text (the fast tokenizer batches
    in Rust): chat-template texts keep their special tokens, plain texts are literal."""
    special = special or SpecialIds.of(tokenizer)
    template = resolve_template(template, tokenizer)
    if template == "gdgpt":
        return _encode_gdgpt(samples, tokenizer, max_seq_len, special)
    chat = [uses_chat_template(s, template) for s in samples]
    stops = any(chat) and bool(chat_style(tokenizer).eot_token)  # the template's end-of-turn ends its turns
    rendered = [render(s, template, tokenizer) for s in samples]
    pieces: list = [None] * len(samples)
    for kind in (False, True):
        idx = [i for i, c in enumerate(chat) if c == kind]
        if not idx:
            continue
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(["".join(seg.text for seg in rendered[i]) for i in idx], add_special_tokens=False,
                            return_offsets_mapping=True, split_special_tokens=not kind)
            for i, ids, offsets in zip(idx, enc["input_ids"], enc["offset_mapping"]):
                pieces[i] = (np.asarray(ids, dtype=np.int64), _target_by_offsets(rendered[i], offsets))
        else:
            for i in idx:
                pieces[i] = _encode_by_segment(rendered[i], tokenizer, literal=not kind)
    return [_finish(ids, target, special, max_seq_len, chat=c, chat_stops=stops)
            for (ids, target), c in zip(pieces, chat)]


def encode(sample: Sample, tokenizer, max_seq_len: int, template: str = "default") -> Encoded:
    return encode_batch([sample], tokenizer, max_seq_len, template)[0]


def encode_prompt(text: str, tokenizer, template: str = "default", chat: bool | None = None) -> list[int]:
    """Token ids of a generation prompt's text with the training rules (`chat`: the text came
    from the chat template; default: whenever `template` resolves to it)."""
    if chat is None:
        chat = resolve_template(template, tokenizer) == "chat_template"
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=not chat)["input_ids"]
    bos = SpecialIds.of(tokenizer).bos
    return ids if chat or bos is None or (ids and ids[0] == bos) else [bos] + ids


def prompt_token_ids(sample, tokenizer, template: str = "default", pending: list[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a sample in prompt form (data.templates.render_prompt), as training encodes it."""
    from .samples import parse_sample

    if isinstance(sample, dict):
        sample = parse_sample(sample, "<prompt>", 0, for_prompt=True)
    if resolve_template(template, tokenizer) == "gdgpt":  # piece by piece, no BOS, as gdGPT
        texts = [text for text, _ in gdgpt_prompt_pieces(sample, gdgpt_eos(tokenizer), pending)]
        return [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids]
    chat = uses_chat_template(sample, resolve_template(template, tokenizer))
    return encode_prompt(render_prompt(sample, template, tokenizer, pending), tokenizer, template, chat=chat)


def _encode_gdgpt(samples: list[Sample], tokenizer, max_seq_len: int, special: SpecialIds) -> list[Encoded]:
    """Every sample's gdGPT pieces tokenized separately (one batched call), no BOS."""
    rendered = [render(s, "gdgpt", tokenizer) for s in samples]
    flat = [seg.text for segs in rendered for seg in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, at, no_bos = [], 0, replace(special, bos=None)
    for segs in rendered:
        parts = ids[at:at + len(segs)]
        at += len(segs)
        tokens = np.asarray([i for p in parts for i in p], dtype=np.int64)
        target = np.asarray([seg.target for seg, p in zip(segs, parts) for _ in p], dtype=bool)
        out.append(_finish(tokens, target, no_bos, max_seq_len))
    return out


def _target_by_offsets(segs: list[Segment], offsets) -> np.ndarray:
    """A token is target when its first character lies in a target segment."""
    bounds = np.cumsum([0] + [len(s.text) for s in segs])
    is_target = np.array([s.target for s in segs] + [False])
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    return is_target[np.searchsorted(bounds, starts, side="right") - 1]


def _encode_by_segment(segs: list[Segment], tokenizer, literal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Slow tokenizers have no offsets: tokenize segment by segment."""
    ids, target = [], []
    for seg in segs:
        part = tokenizer(seg.text, add_special_tokens=False, split_special_tokens=literal)["input_ids"]
        ids += part
        target += [seg.target] * len(part)
    return np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=bool)


def _finish(ids: np.ndarray, target: np.ndarray, special: SpecialIds, max_seq_len: int, chat: bool = False,
            chat_stops: bool = False) -> Encoded:
    if not chat and special.bos is not None:
        ids, target = np.concatenate([[special.bos], ids]), np.concatenate([[False], target])
    if not (chat and chat_stops) and not (ids == special.eos).any():
        ids, target = np.concatenate([ids, [special.eos]]), np.concatenate([target, [True]])
    truncated = len(ids) > max_seq_len
    return Encoded(ids[:max_seq_len], target[:max_seq_len], truncated)
