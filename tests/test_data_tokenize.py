"""Golden token/label layouts per sample type on the tiny tokenizer."""
import numpy as np
import pytest

from data import encode, parse_sample, render
from data.packing import IGNORE, layout_row

BOS, EOS = 1, 2
API_ROUND = ["ans-api", {"actions": [{"inner_thought": "Look it up.", "api_name": "search",
                                      "api_param": {"query": "rain"}, "api_res": "Status Code: 200."}],
                         "ans": "It rains."}]
# (sample, full rendered text, decoded target runs in order; the last run ends with EOS)
GOLDEN = [
    ({"type": "pretrain", "text": "The river begins high in the mountains."},
     "The river begins high in the mountains.",
     ["The river begins high in the mountains.</s>"]),
    ({"type": "instruct", "instruct": "List the primary colors of light.", "output": "Red, green and blue."},
     "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
     "### Instruction:\nList the primary colors of light.\n\n### Response:\nRed, green and blue.",
     ["Red, green and blue.</s>"]),
    ({"type": "instruct", "instruct": "Classify the animal.", "input": "dolphin", "output": "mammal"},
     "Below is an instruction that describes a task, paired with an input that provides further context. "
     "Write a response that appropriately completes the request.\n\n"
     "### Instruction:\nClassify the animal.\n\n### Input:\ndolphin\n\n### Response:\nmammal",
     ["mammal</s>"]),
    ({"type": "conversation", "rounds": [["ask", "Hello"], ["ask", "Who are you?"], ["ans", "A helper."],
                                         ["ask", "Thanks"], ["ans", "You are welcome."]]},
     "### User:\nHello\nWho are you?\n\n### Assistant:\nA helper.\n\n### User:\nThanks\n\n### Assistant:\n"
     "You are welcome.",
     ["A helper.", "You are welcome.</s>"]),
    ({"type": "ref_qa", "reference": "The library closes at five.",
      "rounds": [["ask", "When does it close?"], ["ans", "At five."]]},
     "### Reference:\nThe library closes at five.\n\n### User:\nWhen does it close?\n\n### Assistant:\nAt five.",
     ["At five.</s>"]),
    ({"type": "conver_has_api", "api_desc": "search: find a word.",
      "rounds": [["ask", "Is it raining?"], API_ROUND, ["ask", "Thanks"], ["ans", "You are welcome."]]},
     "### API:\nsearch: find a word.\n\n### User:\nIs it raining?\n\n### Assistant:\n"
     "Thought: Look it up.\nAction: search\nAction Input: {\"query\": \"rain\"}\nObservation: Status Code: 200.\n"
     "Final Answer: It rains.\n\n### User:\nThanks\n\n### Assistant:\nYou are welcome.",
     ["Thought: Look it up.\nAction: search\nAction Input: {\"query\": \"rain\"}\nObservation:",
      "Final Answer: It rains.", "You are welcome.</s>"]),
]


def target_runs(tok, ids, target):
    runs, start = [], None
    for i, t in enumerate(list(target) + [False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append(tok.decode(ids[start:i]))
            start = None
    return runs


@pytest.mark.parametrize("raw,text,runs", GOLDEN, ids=[g[0]["type"] + str(i) for i, g in enumerate(GOLDEN)])
def test_golden_layout(tiny_tokenizer, raw, text, runs):
    sample = parse_sample(raw)
    assert "".join(s.text for s in render(sample)) == text
    enc = encode(sample, tiny_tokenizer, 1024)
    ids = enc.ids.tolist()
    assert ids[0] == BOS and ids.count(BOS) == 1, "BOS exactly once, first"
    assert ids[-1] == EOS and ids.count(EOS) == 1 and enc.target[-1], "EOS exactly once, last, and a target"
    assert not enc.target[0] and not enc.truncated
    assert target_runs(tiny_tokenizer, enc.ids, enc.target) == runs
    assert tiny_tokenizer.decode(ids[1:-1]) == text


def test_api_result_is_context_and_api_param_object_is_json(tiny_tokenizer):
    enc = encode(parse_sample(GOLDEN[-1][0]), tiny_tokenizer, 1024)
    context = tiny_tokenizer.decode(enc.ids[~enc.target])
    assert "Status Code: 200." in context and "{\"query\": \"rain\"}" not in context


def test_labels_are_shifted_targets_within_the_document(tiny_tokenizer):
    enc = encode(parse_sample(GOLDEN[2][0]), tiny_tokenizer, 1024)
    row = layout_row([(enc.ids, enc.target)], 256, pad_id=0)
    n = len(enc.ids)
    want = np.where(enc.target[1:], enc.ids[1:], IGNORE)
    np.testing.assert_array_equal(row["labels"][:n - 1], want)
    assert (row["labels"][n - 1:] == IGNORE).all(), "the EOS position and padding predict nothing"
    np.testing.assert_array_equal(row["input_ids"][n:], 0)
    np.testing.assert_array_equal(row["position_ids"], np.r_[np.arange(n), np.arange(256 - n)])


def test_truncation_is_flagged_and_keeps_the_prefix(tiny_tokenizer):
    raw = {"type": "instruct", "instruct": "Write a short poem about rain.", "output": "Rain is falling all around."}
    full = encode(parse_sample(raw), tiny_tokenizer, 1024)
    cut = encode(parse_sample(raw), tiny_tokenizer, len(full.ids) - 3)
    assert cut.truncated and not full.truncated
    np.testing.assert_array_equal(cut.ids, full.ids[:len(full.ids) - 3])
    assert EOS not in cut.ids.tolist()


def test_tiny_tokenizer_matches_the_tiny_llama_config(tiny_tokenizer):
    from models.llama import tiny_hf_config

    cfg = tiny_hf_config()
    assert len(tiny_tokenizer) == cfg["vocab_size"]
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id,
            tiny_tokenizer.unk_token_id) == (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], 3)
    text = "The lighthouse keeper lit the lamp.\nIt rains."
    assert tiny_tokenizer.decode(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) == text
