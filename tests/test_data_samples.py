"""Sample validation: every malformed case names file, sample index and field in one line."""
import json

import pytest

from data import SampleError, build_dataset, parse_sample
from data.samples import Answer, ApiAnswer, Ask, ConverHasApi, Instruct

ACTION = {"inner_thought": "t", "api_name": "search", "api_param": "{}", "api_res": "ok"}
API = {"type": "conver_has_api", "api_desc": "search: find."}


def api_with(**action_changes):
    action = {k: v for k, v in {**ACTION, **action_changes}.items() if v is not None}
    return {**API, "rounds": [["ask", "q"], ["ans-api", {"actions": [action], "ans": "a"}]]}


def convo(*rounds):
    return {"type": "conversation", "rounds": list(rounds)}


MALFORMED = [  # (sample, field named in the error, words in the problem)
    ([1, 2], "type", "must be an object"),
    ({"text": "x"}, "type", "missing"),
    ({"type": "chat", "text": "x"}, "type", "unknown sample type"),
    ({"type": 5}, "type", "expected string"),
    ({"type": "pretrain"}, "text", "missing"),
    ({"type": "pretrain", "text": ["a"]}, "text", "expected string"),
    ({"type": "pretrain", "text": "  "}, "text", "empty"),
    ({"type": "instruct", "output": "o"}, "instruct", "missing"),
    ({"type": "instruct", "instruct": "i"}, "output", "missing"),
    ({"type": "instruct", "instruct": "i", "output": ""}, "output", "empty"),
    ({"type": "instruct", "instruct": "i", "input": 3, "output": "o"}, "input", "expected string"),
    ({"type": "conversation"}, "rounds", "missing"),
    ({"type": "conversation", "rounds": "hi"}, "rounds", "expected list"),
    (convo(), "rounds", "empty"),
    (convo(["ask"]), "rounds[0]", "pair"),
    (convo(["user", "q"], ["ans", "a"]), "rounds[0][0]", "unknown role"),
    (convo(["ans", "a"]), "rounds[0][0]", "must follow an 'ask'"),
    (convo(["ask", "q"], ["ans", "a"], ["ans", "b"]), "rounds[2][0]", "must follow an 'ask'"),
    (convo(["ask", "q"], ["ans", "a"], ["ask", "q2"]), "rounds[2]", "must end with an answer"),
    (convo(["ask", "q"], ["ans", 7]), "rounds[1][1]", "expected string"),
    (convo(["ask", "q"], ["ans", ""]), "rounds[1][1]", "empty"),
    (convo(["ask", "q"], ["ans-api", {"actions": [ACTION], "ans": "a"}]), "rounds[1][0]", "unknown role"),
    ({"type": "conver_has_api", "rounds": [["ask", "q"], ["ans", "a"]]}, "api_desc", "missing"),
    ({**API, "rounds": [["ask", "q"], ["ans-api", "a"]]}, "rounds[1][1]", "expected object"),
    ({**API, "rounds": [["ask", "q"], ["ans-api", {"ans": "a"}]]}, "rounds[1].actions", "missing"),
    ({**API, "rounds": [["ask", "q"], ["ans-api", {"actions": [], "ans": "a"}]]}, "rounds[1].actions", "empty"),
    ({**API, "rounds": [["ask", "q"], ["ans-api", {"actions": ["x"], "ans": "a"}]]}, "rounds[1].actions[0]",
     "expected object"),
    ({**API, "rounds": [["ask", "q"], ["ans-api", {"actions": [ACTION]}]]}, "rounds[1].ans", "missing"),
    (api_with(api_name=None), "rounds[1].actions[0].api_name", "missing"),
    (api_with(api_name=""), "rounds[1].actions[0].api_name", "empty"),
    (api_with(api_param=None), "rounds[1].actions[0].api_param", "missing"),
    (api_with(api_res=None), "rounds[1].actions[0].api_res", "missing"),
    (api_with(inner_thought=3), "rounds[1].actions[0].inner_thought", "expected string"),
    ({"type": "ref_qa", "rounds": [["ask", "q"], ["ans", "a"]]}, "reference", "missing"),
    ({"type": "ref_qa", "reference": {"t": 1}, "rounds": [["ask", "q"], ["ans", "a"]]}, "reference",
     "expected string"),
    ({"type": "ref_qa", "reference": "r", "rounds": [["ask", "q"]]}, "rounds[0]", "must end with an answer"),
]


@pytest.mark.parametrize("sample,field,problem", MALFORMED, ids=[f"{i}-{m[1]}" for i, m in enumerate(MALFORMED)])
def test_malformed_sample_names_file_index_field(sample, field, problem):
    with pytest.raises(SampleError) as info:
        parse_sample(sample, "data/train.jsonl", 41)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.file, err.index, err.field) == ("data/train.jsonl", 41, field)
    assert problem in err.problem
    assert str(err).startswith("data/train.jsonl: sample 41: field '" + field + "'") and "\n" not in str(err)


def test_accepted_variants():
    merged = parse_sample(convo(["ask", "Hello"], ["ask", "Who are you?"], ["ans", "A helper."]))
    assert merged.rounds == (Ask("Hello\nWho are you?"), Answer("A helper."))
    as_object = parse_sample(api_with(api_param={"query": "rain", "n": 2}, api_res={"ok": True}))
    as_string = parse_sample(api_with(api_param='{"query": "rain", "n": 2}'))
    assert isinstance(as_object, ConverHasApi) and isinstance(as_object.rounds[1], ApiAnswer)
    assert as_object.rounds[1].actions[0].api_param == as_string.rounds[1].actions[0].api_param
    assert as_object.rounds[1].actions[0].api_res == '{"ok": true}'
    assert parse_sample({"type": "instruct", "instruct": "i", "input": "", "output": "o", "id": 9}) == \
        Instruct(instruct="i", output="o", input="")


def write_jsonl(path, samples, bad_lines=()):
    lines = [json.dumps(s) for s in samples]
    for at, text in bad_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = [{"type": "pretrain", "text": f"The river number {i} runs to the sea."} for i in range(5)]


@pytest.mark.parametrize("bad,field", [('{"type": "pretrain", "text": ""}', "text"), ('{"type": "pretr', "json")])
def test_file_errors_name_the_file_and_index_or_are_skipped(tmp_path, tiny_tokenizer, bad, field):
    path = write_jsonl(tmp_path / "mixed.jsonl", GOOD, bad_lines=[(2, bad)])
    with pytest.raises(SampleError) as info:
        build_dataset([path], tiny_tokenizer, 64, cache_dir=str(tmp_path / "cache"))
    assert (info.value.file, info.value.index, info.value.field) == (path, 2, field)
    ds = build_dataset([path], tiny_tokenizer, 64, skip_bad_samples=True, cache_dir=str(tmp_path / "cache"))
    assert (ds.stats["samples"], ds.stats["skipped"], len(ds)) == (5, 1, 5)
    with pytest.raises(SampleError, match="sample 2"):  # a cache built while skipping does not hide the error
        build_dataset([path], tiny_tokenizer, 64, cache_dir=str(tmp_path / "cache"))
