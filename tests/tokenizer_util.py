"""A tiny sentencepiece llama tokenizer for tests, trained in milliseconds on examples/data/.

Ids match models/llama.py tiny_hf_config: pad 0, bos 1, eos 2, unk 3; vocab <= 512.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def _strings(obj):
    """Every string inside a JSON value (sample texts, answers, api fields)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def example_texts() -> list[str]:
    texts = []
    for path in sorted(EXAMPLE_DATA.iterdir()):
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".json":
            records = json.loads(path.read_text())
        else:
            continue
        texts.extend(_strings(records))
    # Template words, so prompts tokenize into a handful of pieces.
    texts.append("Below is an instruction. ### Instruction: ### Input: ### Response: ### User: ### Assistant: "
                 "### Reference: ### API: Thought: Action: Action Input: Observation: Final Answer:")
    return texts


def train_sentencepiece(model_prefix: str, vocab_size: int = 320) -> str:
    import sentencepiece as spm

    lines = [line for text in example_texts() for line in text.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, user_defined_symbols=["\n"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
    return model_prefix + ".model"


def make_tokenizer(tmp_dir, vocab_size: int = 320):
    """A LlamaTokenizer saved under `tmp_dir` (loadable with AutoTokenizer.from_pretrained(tmp_dir))."""
    from transformers import LlamaTokenizer

    assert vocab_size <= 512, "the tiny models expect a small vocab"
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(str(tmp_dir / "tokenizer"), vocab_size)  # writes tokenizer.model, what from_pretrained reads
    tok = LlamaTokenizer.from_pretrained(str(tmp_dir), pad_token="<pad>")
    tok.save_pretrained(str(tmp_dir))
    return tok


try:
    import pytest

    @pytest.fixture(scope="session")
    def tiny_tokenizer(tmp_path_factory):
        """Session-wide tiny tokenizer; import this name into a test module to use it."""
        return make_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))
except ImportError:  # used outside pytest (benchmarks, quickstart)
    pass
