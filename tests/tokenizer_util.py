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


# Chat templates of two styles, as hub tokenizers ship them in tokenizer_config.json:
# ChatML (SmolLM2-Instruct's, default system prompt included) and Llama-3-Instruct's.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT_STYLES = {
    # special tokens (first ones get the lowest ids), bos, eos, pad, whether the tokenizer adds BOS itself
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", "<|im_end|>", False,
               CHATML_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", True, LLAMA3_TEMPLATE),
}


def make_chat_tokenizer(tmp_dir, style: str, vocab_size: int = 320):
    """A GPT-2-style byte-level BPE tokenizer.json trained on examples/data, with the special
    tokens and chat template (written into tokenizer_config.json) of `style` ("chatml", "llama3");
    loaded back with AutoTokenizer from `tmp_dir`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials, bos, eos, pad, adds_bos, template = CHAT_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(example_texts(), trainer)
    if adds_bos:  # Llama-3's tokenizer.json prepends BOS on its own
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)])
    fast.save_pretrained(tmp_dir)
    for extra in Path(tmp_dir).glob("chat_template.jinja"):
        extra.unlink()
    config = Path(tmp_dir) / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}, indent=1))
    return AutoTokenizer.from_pretrained(tmp_dir)
