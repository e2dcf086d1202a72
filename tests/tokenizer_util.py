"""A tiny sentencepiece llama tokenizer for tests, trained in milliseconds on examples/data/.

Ids match models/llama.py tiny_hf_config: pad 0, bos 1, eos 2, unk 3; vocab <= 512.
"""
from __future__ import annotations

from pathlib import Path

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def example_texts() -> list[str]:
    from models.tiny import sample_texts

    texts = sample_texts(sorted(p for p in EXAMPLE_DATA.iterdir() if p.suffix in (".json", ".jsonl")))
    # Template words, so prompts tokenize into a handful of pieces.
    texts.append("Below is an instruction. ### Instruction: ### Input: ### Response: ### User: ### Assistant: "
                 "### Reference: ### API: Thought: Action: Action Input: Observation: Final Answer:")
    return texts


def make_tokenizer(tmp_dir, vocab_size: int = 320):
    """A LlamaTokenizer saved under `tmp_dir` (loadable with AutoTokenizer.from_pretrained(tmp_dir))."""
    from models.tiny import make_tiny_tokenizer

    assert vocab_size <= 512, "the tiny models expect a small vocab"
    return make_tiny_tokenizer(tmp_dir, example_texts(), vocab_size)
