"""Golden token/label layouts per sample type on the tiny tokenizer."""
import json

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


# ----------------------------------------------------------------------------- chat templates
CHAT_SAMPLES = [
    {"type": "conversation", "system": "You answer briefly.",
     "rounds": [["ask", "Hello"], ["ans", "Hi, how can I help?"], ["ask", "Name a colour."], ["ans", "Blue."]]},
    {"type": "instruct", "instruct": "Classify the animal.", "input": "dolphin", "output": "mammal"},
    {"type": "ref_qa", "reference": "The library closes at five.",
     "rounds": [["ask", "When does it close?"], ["ans", "At five."]]},
    {"type": "conver_has_api", "api_desc": "search: find a word.",
     "rounds": [["ask", "Is it raining?"], API_ROUND, ["ask", "Thanks"], ["ans", "You are welcome."]]},
]
# per sample: the assistant contents, in order (each must be target, followed by the end-of-turn token)
CHAT_ANSWERS = [
    ["Hi, how can I help?", "Blue."],
    ["mammal"],
    ["At five."],
    ["Thought: Look it up.\nAction: search\nAction Input: {\"query\": \"rain\"}", "Final Answer: It rains.",
     "You are welcome."],
]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def chat_tok(request, tmp_path_factory):
    from tests.tokenizer_util import make_chat_tokenizer

    return request.param, make_chat_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def id_runs(ids, target):
    runs, start = [], None
    for i, t in enumerate(list(target) + [False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append(list(ids[start:i]))
            start = None
    return runs


@pytest.mark.parametrize("index", range(len(CHAT_SAMPLES)), ids=[s["type"] for s in CHAT_SAMPLES])
def test_chat_template_label_mask_is_each_answer_and_its_end_of_turn(chat_tok, index):
    """auto = the tokenizer's chat template: the token ids are the template's rendering tokenized
    as is (BOS once, only where the template writes it), and the target runs are exactly each
    assistant content + the end-of-turn token; system prompt, user turns, tool results and the
    newline after <|im_end|> are context."""
    from data.templates import chat_messages, chat_style

    style, tok = chat_tok
    sample = parse_sample(CHAT_SAMPLES[index])
    enc = encode(sample, tok, 1024, template="auto")
    messages, _ = chat_messages(sample, chat_style(tok))
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert enc.ids.tolist() == tok(whole, add_special_tokens=False)["input_ids"]
    assert enc.ids.tolist().count(tok.bos_token_id) == (1 if style == "llama3" else whole.count("<|im_start|>"))
    if style == "llama3":
        assert enc.ids[0] == tok.bos_token_id
    eot = tok.convert_tokens_to_ids("<|im_end|>" if style == "chatml" else "<|eot_id|>")
    want = [tok(a, add_special_tokens=False)["input_ids"] + [eot] for a in CHAT_ANSWERS[index]]
    assert id_runs(enc.ids, enc.target) == want
    if isinstance(sample, type(parse_sample(CHAT_SAMPLES[3]))):
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]
        assert "Status Code: 200." in tok.decode(enc.ids[~enc.target])
    if index == 0:
        assert messages[0] == {"role": "system", "content": "You answer briefly."}


def test_chat_prompt_is_the_training_tokens_up_to_the_answer(chat_tok):
    """What the demo feeds the model = the training sample's tokens up to its last answer."""
    from data.tokenize import prompt_token_ids

    _, tok = chat_tok
    for raw in CHAT_SAMPLES[:3]:
        full = encode(parse_sample(raw), tok, 1024, template="auto")
        prompt = dict(raw)
        if raw["type"] == "instruct":
            prompt.pop("output")
        else:
            prompt["rounds"] = raw["rounds"][:-1]
        ids = prompt_token_ids(prompt, tok, "auto")
        first_answer = len(full.ids) - len(id_runs(full.ids, full.target)[-1]) - int(not full.target[-1])
        assert ids == full.ids[:len(ids)].tolist() and len(ids) == first_answer, raw["type"]


def test_default_layout_and_pretrain_on_a_chat_tokenizer(chat_tok):
    """prompt_template default keeps the ### layout; pretrain stays plain text under auto; BOS is
    added only when the tokenizer itself adds one (Llama-3's does, ChatML's <|im_start|> is no BOS)."""
    style, tok = chat_tok
    for raw, template in ((GOLDEN[3][0], "default"), (GOLDEN[0][0], "auto")):
        enc = encode(parse_sample(raw), tok, 1024, template=template)
        ids = enc.ids.tolist()
        body = ids[1:] if style == "llama3" else ids
        assert (ids[0] == tok.bos_token_id) == (style == "llama3") and tok.bos_token_id not in body
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1 and enc.target[-1]
        assert tok.decode(body[:-1]) == "".join(s.text for s in render(parse_sample(raw)))


def test_template_choice_keys_the_cache(tmp_path, chat_tok):
    from data import build_dataset
    from data.templates import TemplateError, resolve_template

    _, tok = chat_tok
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in CHAT_SAMPLES) + "\n")
    cache = tmp_path / "cache"
    rows = {t: build_dataset([str(path)], tok, 256, template=t, cache_dir=str(cache))[0]["labels"]
            for t in ("auto", "chat_template", "default")}
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2, "auto = chat_template: one cache; default: another"
    assert (rows["auto"] == rows["chat_template"]).all() and not np.array_equal(rows["auto"], rows["default"])
    with pytest.raises(TemplateError, match="unknown prompt_template"):
        resolve_template("chatml", tok)
