"""Reading (JSON array / JSONL, streamed), mixing weights, the tokenized cache, templates."""
import json
import multiprocessing
import os

import pytest

import data.cache
import data.reader
from data import SampleError, build_dataset, encode, encode_prompt, parse_sample, render_prompt
from data.templates import render
from tests.tokenizer_util import EXAMPLE_DATA

SAMPLES = [json.loads(line) for line in (EXAMPLE_DATA / "instruct.jsonl").read_text().splitlines()]


def rows(ds):
    return [tuple(tuple(ds[i][k].tolist()) for k in ("input_ids", "labels", "position_ids")) for i in range(len(ds))]


def write(path, text):
    path.write_text(text)
    return str(path)


def test_json_array_and_jsonl_read_the_same_samples_across_chunk_edges(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data.reader, "_CHUNK", 7)  # every value straddles reads
    jsonl = write(tmp_path / "a.jsonl", "\n\n".join(json.dumps(s) for s in SAMPLES))  # blank lines are skipped
    array = write(tmp_path / "a.json", "\ufeff \n" + json.dumps(SAMPLES, indent=2))
    records = [r for _, r in data.reader.read_records(array)]
    assert records == [r for _, r in data.reader.read_records(jsonl)] == SAMPLES
    assert rows(build_dataset([jsonl], tiny_tokenizer, 256)) == rows(build_dataset([array], tiny_tokenizer, 256))
    assert list(data.reader.read_records(write(tmp_path / "e.json", " [ ] "))) == []


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_json_array_values_cut_by_a_read_are_not_decoded_short(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data.reader, "_CHUNK", chunk)
    values = [{"n": 12.5e3, "s": "a, ]"}, 1234.5, True, None, [1, 2.25], "x", -7]
    path = write(tmp_path / "v.json", json.dumps(values, separators=(",", ":")))
    assert [v for _, v in data.reader.read_records(path)] == values


@pytest.mark.parametrize("text", ['[{"type": "pretrain", "text": "a"},]', '[{"type": "pretrain", "text": "a"} {}]',
                                  '[{"type": "pretrain", "text": "a"}', '[1, 2'])
def test_broken_json_array_is_an_error(tmp_path, text):
    with pytest.raises(SampleError, match="invalid JSON array"):
        list(data.reader.read_records(write(tmp_path / "bad.json", text)))


def test_mixing_weights_repeat_and_subsample(tmp_path, tiny_tokenizer):
    a = write(tmp_path / "a.jsonl", "\n".join(json.dumps(s) for s in SAMPLES[:6]))
    b = write(tmp_path / "b.jsonl", "\n".join(json.dumps(s) for s in SAMPLES[6:]))
    base = build_dataset([a, b], tiny_tokenizer, 256)
    mixed = build_dataset([a, b], tiny_tokenizer, 256, weights=[2, 0.5])
    assert mixed.stats["docs"] == 2 * 6 + 3
    as_set = lambda ds: sorted(rows(ds))  # noqa: E731
    a_rows = as_set(build_dataset([a], tiny_tokenizer, 256))
    assert sorted(a_rows * 2 + [r for r in as_set(mixed) if r not in a_rows]) == as_set(mixed)
    assert len(build_dataset([a, b], tiny_tokenizer, 256, weights=[1, 0])) == 6
    halves = {tuple(as_set(build_dataset([b], tiny_tokenizer, 256, weights=[0.5], seed=s))) for s in range(6)}
    assert len(halves) > 1, "the subsample depends on the seed"
    assert len(base) == 12
    with pytest.raises(ValueError, match="2 data files"):
        build_dataset([a, b], tiny_tokenizer, 256, weights=[1])


def count_builds(monkeypatch, log):
    real = data.cache._build

    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(data.cache, "_build", logged)


def test_cache_is_reused_and_keyed_by_what_changes_tokens(tmp_path, tiny_tokenizer, monkeypatch):
    log, cache = tmp_path / "builds.log", str(tmp_path / "cache")
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(s) for s in SAMPLES))
    uncached = rows(build_dataset([path], tiny_tokenizer, 256))
    count_builds(monkeypatch, log)
    builds = lambda: len(log.read_text().split()) if log.exists() else 0  # noqa: E731
    first = build_dataset([path], tiny_tokenizer, 256, cache_dir=cache)
    again = build_dataset([path], tiny_tokenizer, 256, cache_dir=cache, packing=True, weights=[3], seed=5)
    assert builds() == 1 and rows(first) == uncached
    assert again.stats["docs"] == 3 * len(SAMPLES)
    build_dataset([path], tiny_tokenizer, 200, cache_dir=cache)
    assert builds() == 2, "max_seq_len is part of the key"
    os.utime(path, ns=(1, 1))
    build_dataset([path], tiny_tokenizer, 256, cache_dir=cache)
    assert builds() == 3, "a modified file is re-tokenized"
    assert not [n for n in os.listdir(cache) if ".tmp-" in n], "no temporary directories left behind"


def _build_in_child(args):
    path, tok_dir, cache = args
    from transformers import AutoTokenizer
    ds = build_dataset([path], AutoTokenizer.from_pretrained(tok_dir), 256, cache_dir=cache)
    return rows(ds)


def test_concurrent_builders_tokenize_once(tmp_path, tiny_tokenizer, monkeypatch):
    log, cache = tmp_path / "builds.log", str(tmp_path / "cache")
    count_builds(monkeypatch, log)  # inherited by the forked ranks
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(s) for s in SAMPLES))
    tok_dir = str(tmp_path / "tok")
    tiny_tokenizer.save_pretrained(tok_dir)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_build_in_child, [(path, tok_dir, cache)] * 3)
    assert len(log.read_text().split()) == 1
    assert results[0] == results[1] == results[2]


def test_too_long_samples_are_truncated_or_dropped_and_counted(tmp_path, tiny_tokenizer):
    long_answer = {"type": "instruct", "instruct": "Say it.", "output": "word " * 200}
    long_prompt = {"type": "instruct", "instruct": "word " * 200, "output": "ok"}
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(s) for s in [long_answer, long_prompt, SAMPLES[0]]))
    ds = build_dataset([path], tiny_tokenizer, 200)
    assert (ds.stats["truncated"], ds.stats["dropped"], len(ds)) == (2, 1, 2)
    assert all(ds[i]["input_ids"].shape == (200,) for i in range(len(ds)))


def test_render_prompt_is_the_training_text_up_to_the_answer(tiny_tokenizer):
    for raw in (SAMPLES[0], SAMPLES[1]):
        prompt = render_prompt({k: v for k, v in raw.items() if k != "output"})
        assert "".join(s.text for s in render(parse_sample(raw))) == prompt + raw["output"]
    convo = {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello."], ["ask", "Why?"]]}
    assert render_prompt(convo).endswith("### User:\nWhy?\n\n### Assistant:\n")
    ids = encode_prompt(render_prompt(convo), tiny_tokenizer)
    assert ids[0] == 1 and 2 not in ids


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_template_targets_the_assistant_turns(tiny_tokenizer):
    tok = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = CHAT
    raw = {"type": "conver_has_api", "api_desc": "search: find.",
           "rounds": [["ask", "Is it raining?"],
                      ["ans-api", {"actions": [{"inner_thought": "Look.", "api_name": "search", "api_param": "{}",
                                                "api_res": "wet"}], "ans": "Yes."}]]}
    sample = parse_sample(raw)
    text = "".join(s.text for s in render(sample, "auto", tok))
    assert text == ("<|user|>\nAPI:\nsearch: find.\n\nIs it raining?</s>\n<|assistant|>\n"
                    "Thought: Look.\nAction: search\nAction Input: {}</s>\n<|tool|>\nwet</s>\n"
                    "<|assistant|>\nFinal Answer: Yes.</s>\n"), "the api result is a tool message"
    enc = encode(sample, tok, 512, template="chat_template")
    ids = enc.ids.tolist()
    assert ids[0] != 1 and ids.count(2) == 4, "the template's text as is: no BOS added, its </s> not doubled"
    assert tok.decode(enc.ids[enc.target]).replace(" ", "") == (
        "Thought:Look.\nAction:search\nActionInput:{}</s>FinalAnswer:Yes.</s>")
    prompt = render_prompt({"type": "instruct", "instruct": "Hi"}, "chat_template", tok)
    assert prompt == "<|user|>\nHi</s>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="chat_template"):
        render(sample, "chat_template", tiny_tokenizer)
    assert render(sample, "auto", tiny_tokenizer) == render(sample, "default"), "auto without a chat template"


def test_worker_pool_gives_the_same_cache_and_errors(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data.cache, "CHUNK_SIZE", 3)
    monkeypatch.setattr(data.cache, "POOL_AFTER_CHUNKS", 2)
    lines = [json.dumps(s) for s in SAMPLES]
    lines.insert(9, '{"type": "instruct", "instruct": "no output"}')
    path = write(tmp_path / "a.jsonl", "\n".join(lines))
    build = lambda workers: build_dataset([path], tiny_tokenizer, 256, num_workers=workers,  # noqa: E731
                                          skip_bad_samples=True)
    serial, pooled = build(1), build(2)
    assert rows(serial) == rows(pooled) and len(pooled) == len(SAMPLES)
    assert serial.stats == pooled.stats and pooled.stats["skipped"] == 1
    with pytest.raises(SampleError, match="sample 9: field 'output'"):
        build_dataset([path], tiny_tokenizer, 256, num_workers=2)
