"""Tiny random HF models + sentencepiece tokenizers, made locally (nothing is downloaded).

Used by the quickstart and the tests: `make_tiny_hf_model(out_dir, "llama", text_files)` writes
a directory that looks like any HF checkpoint (config.json, safetensors, tokenizer files).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from . import get_family

SPECIAL_IDS = dict(pad_id=0, bos_id=1, eos_id=2, unk_id=3)


def sample_texts(files: list[str | Path]) -> list[str]:
    """Every string value in JSON/JSONL sample files (enough text to train a tiny tokenizer)."""
    texts: list[str] = []

    def walk(x):
        if isinstance(x, str):
            texts.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for f in files:
        raw = Path(f).read_text()
        try:
            walk(json.loads(raw))
        except json.JSONDecodeError:
            for line in raw.splitlines():
                if line.strip():
                    walk(json.loads(line))
    return texts


def make_tiny_tokenizer(out_dir: str | Path, texts: list[str], vocab_size: int = 320):
    """Train a BPE sentencepiece model on `texts` (newlines kept as a symbol, whitespace as is, so
    prompt templates round-trip) and save it as a Llama tokenizer in out_dir (tokenizer.model too)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=f"{tmp}/tokenizer", vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, user_defined_symbols=["\n"], normalization_rule_name="identity",
            remove_extra_whitespaces=False, num_threads=1, hard_vocab_limit=False, minloglevel=2, **SPECIAL_IDS)
        shutil.copy(f"{tmp}/tokenizer.model", out_dir / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(out_dir), pad_token="<pad>", add_bos_token=True)  # as llama's own tokenizers
    tok.save_pretrained(out_dir)
    return tok


def make_tiny_hf_model(out_dir: str | Path, family_name: str = "llama", texts: list[str] | None = None,
                       seed: int = 0, **config_overrides) -> Path:
    """A random HF model of the family's tiny size + tokenizer, saved like a hub checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    family = get_family(family_name)
    cfg = family.tiny_hf_config(**config_overrides)
    torch.manual_seed(seed)
    if hasattr(family, "REMOTE_CODE_DIR"):  # transformers lacks the family: our remote code builds it
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in Path(family.REMOTE_CODE_DIR).glob("*.py"):
            shutil.copy2(f, out_dir / f.name)
        (out_dir / "config.json").write_text(json.dumps(family.export_hf_config(cfg), indent=2))
        config = AutoConfig.from_pretrained(out_dir, trust_remote_code=True)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    else:
        model_type = cfg.pop("model_type")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    model.save_pretrained(out_dir)
    make_tiny_tokenizer(out_dir, texts or ["a tiny model that knows nothing yet"] * 4)
    return out_dir
