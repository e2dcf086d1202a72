"""demo.py: generation with the training templates, from a pipeline checkpoint or an HF dir.

Golden outputs: greedy decoding of a tiny random model (fixed seed) by our loop equals
transformers' own generate() on the same HF dir token for token, whichever source and backend.
"""
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.inference.generate import (API_STOP, Chat, SamplingConfig, generate, load_lm, load_ours, plan_devices,
                                       process_logits, prompt_ids)

ROOT = Path(__file__).resolve().parent.parent
DATA = [str(p) for p in sorted((ROOT / "examples" / "data").glob("*.json*"))]
PROMPTS = [
    {"type": "instruct", "instruct": "Name a colour.", "input": "The sky"},
    {"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Hi, what can I do for you?"], ["ask", "Tell me a fact."]]},
    {"type": "ref_qa", "reference": "The Great Wall is long.", "rounds": [["ask", "How long is the wall?"]]},
    {"type": "conver_has_api", "api_desc": "getWeather: weather of a city", "rounds": [["ask", "Weather in Paris?"]]},
]
N_NEW = 12


def make_model(root, tied: bool):
    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model, sample_texts

    hf = make_tiny_hf_model(root / "hf", "llama", sample_texts(DATA), seed=3, tie_word_embeddings=tied)
    return hf, hf_to_pp(hf, root / "pp")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("demo"), tied=False)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_both(request, tiny, tmp_path_factory):
    """The tied variant shares the embedding with the head (one module in two places)."""
    return make_model(tmp_path_factory.mktemp("demo_tied"), tied=True) if request.param else tiny


def reference_greedy(hf_dir, ids, n=N_NEW):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("source, backend", [("pp", "ours"), ("hf", "ours"), ("hf", "hf")])
def test_greedy_equals_transformers_generate(tiny_both, source, backend):
    from transformers import AutoTokenizer

    hf, pp = tiny_both
    tok = AutoTokenizer.from_pretrained(hf)
    lm = load_lm(pp if source == "pp" else hf, backend)
    for prompt in PROMPTS:
        ids = prompt_ids(prompt, tok)
        want = reference_greedy(hf, ids)
        pieces = []
        got = generate(lm, tok, ids, SamplingConfig(max_new_tokens=N_NEW), on_text=pieces.append)
        assert got.ids == want[:len(got.ids)], prompt["type"]
        assert len(got.ids) == N_NEW or got.stop_reason == "eos"
        assert "".join(pieces) == got.text == tok.decode(got.ids, skip_special_tokens=True)  # streamed = final


def test_layers_split_over_devices(tiny_both):
    hf, pp = tiny_both
    one = load_ours(pp, ["cpu"])
    split = load_ours(pp, ["cpu", "cpu", "cpu"])
    assert len(split.layer_devices) == len(split.model.defs)
    ids = torch.tensor([[1, 5, 9, 23, 7]])
    torch.testing.assert_close(split.forward(ids), one.forward(ids), rtol=0, atol=0)


def test_plan_devices_contiguous_and_balanced():
    assert plan_devices([1] * 6, ["a", "b"]) == ["a"] * 3 + ["b"] * 3
    assert plan_devices([10, 1, 1, 1, 1, 10], ["a", "b", "c"]) == ["a", "b", "b", "b", "b", "c"]
    assert plan_devices([1, 100, 1], ["a", "b", "c"]) == ["a", "b", "c"]  # every device used
    assert plan_devices([1, 1], ["a", "b", "c"]) == ["a", "b"]
    for sizes in ([5] + [1] * 30 + [5], [1] * 7, [100] + [1] * 9):
        for n in (1, 2, 3, 4, 8):
            plan = [int(d) for d in plan_devices(sizes, [str(k) for k in range(n)])]
            assert plan == sorted(plan) and plan[0] == 0  # contiguous, in order
            assert all(b - a <= 1 for a, b in zip(plan, plan[1:]))  # no device skipped
            assert len(set(plan)) == min(n, len(sizes))


def test_logit_processing_matches_transformers():
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    torch.manual_seed(0)
    logits, seen = torch.randn(50) * 3, [3, 7, 7, 11]
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    ids = torch.tensor([seen])
    ref = logits[None].clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):
        ref = proc(ids, ref)
    got = process_logits(logits, seen, cfg)
    assert torch.equal(torch.isinf(got), torch.isinf(ref[0]))
    finite = torch.isfinite(got)
    torch.testing.assert_close(got[finite], ref[0][finite])
    greedy = process_logits(logits, seen, SamplingConfig(repetition_penalty=1.3))
    assert torch.isfinite(greedy).all()


def test_sampling_is_seeded(tiny):
    from transformers import AutoTokenizer

    hf, pp = tiny
    tok = AutoTokenizer.from_pretrained(hf)
    lm = load_lm(pp)
    ids = prompt_ids(PROMPTS[0], tok)
    cfg = SamplingConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, seed=5)
    a, b = generate(lm, tok, ids, cfg), generate(lm, tok, ids, cfg)
    assert a.ids == b.ids and len(a.ids) > 0


class FakeLM:
    """Plays a fixed token script (`pos` = tokens played; set 0 to replay); records every prompt."""

    def __init__(self, script):
        self.script, self.prompts, self.fed, self.pos = script, [], [], 0

    def reset(self):
        self.fed = []

    def next_logits(self, new_ids):
        if not self.fed:
            self.prompts.append(list(new_ids))
        self.fed += new_ids
        logits = torch.zeros(320)
        logits[self.script[min(self.pos, len(self.script) - 1)]] = 1.0
        self.pos += 1
        return logits


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny[0])


def test_chat_history_reset_and_template(tok):
    from data.templates import render_prompt

    word = tok("Paris", add_special_tokens=False)["input_ids"]
    lm = FakeLM(word + [tok.eos_token_id])
    chat = Chat(lm, tok, "conversation", SamplingConfig(max_new_tokens=20))
    assert chat.ask("Hello").text == "Paris"
    lm.pos = 0
    assert chat.ask("And then?").text == "Paris"
    expected = render_prompt({"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Paris"],
                                                                 ["ask", "And then?"]]})
    assert tok.decode(lm.prompts[-1], skip_special_tokens=True) == tok.decode(tok(expected)["input_ids"],
                                                                               skip_special_tokens=True)
    assert lm.prompts[-1] == prompt_ids({"type": "conversation", "rounds": chat.rounds[:3]}, tok)
    chat.reset()
    lm.pos = 0
    chat.ask("Hello")
    assert lm.prompts[-1] == lm.prompts[0]  # history gone


def test_chat_api_call_stops_for_the_tool(tok):
    call = tok("Action: getWeather\nObservation:", add_special_tokens=False)["input_ids"]
    final = tok("Final Answer: sunny", add_special_tokens=False)["input_ids"]
    lm = FakeLM(call + final + [tok.eos_token_id])
    chat = Chat(lm, tok, "conver_has_api", SamplingConfig(max_new_tokens=60), api_desc="getWeather: weather")
    calls = []
    g = chat.ask("Weather?", observe=lambda text: calls.append(text) or '{"t": 18}')
    assert len(calls) == 1 and calls[0].endswith(API_STOP)
    assert ' {"t": 18}\n' in g.text  # the tool's result entered as context, as in training
    assert len(lm.prompts) == 2 and lm.prompts[1][:len(lm.prompts[0])] == lm.prompts[0]


def run_demo(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def test_prompts_file_to_jsonl(tiny, tmp_path, tok):
    hf, pp = tiny
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS) + json.dumps("plain text prompt") + "\n")
    out = tmp_path / "answers.jsonl"
    proc = run_demo(["--model", str(pp), "--prompts", str(prompts), "--output", str(out), "--type", "instruct",
                     "--max-new-tokens", str(N_NEW)])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert rows[4]["prompt"] == {"type": "instruct", "instruct": "plain text prompt"}
    for r in rows:
        ids = prompt_ids(r["prompt"], tok)
        want = reference_greedy(hf, ids)
        assert r["answer"] == tok.decode(want[:r["n_tokens"]], skip_special_tokens=True)
        assert r["stop_reason"] in ("eos", "length", "stop")


def test_bad_prompt_is_one_line(tiny, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(json.dumps({"type": "conversation", "rounds": [["ask", "a"], ["ans", "b"]]}) + "\n")
    proc = run_demo(["--model", str(tiny[1]), "--prompts", str(prompts)])
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "ask" in proc.stderr
    assert "Traceback" not in proc.stderr


def _read_until(fd, marker: bytes, timeout=90.0) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while marker not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-500:]!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed its side
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_in_a_terminal(tiny, tok):
    """Drive demo.py through a pseudo-terminal: ask, read the streamed answer, /reset, ask again, quit."""
    hf, pp = tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    pid, fd = pty.fork()
    if pid == 0:  # child: the demo in the terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "demo.py", "--model", str(pp), "--max-new-tokens", str(N_NEW)],
                  env)
    try:
        _read_until(fd, b">>> ")
        os.write(fd, b"Hello\n")
        first = _read_until(fd, b">>> ")
        os.write(fd, b"/reset\n")
        assert b"history cleared" in _read_until(fd, b">>> ")
        os.write(fd, b"Hello\n")
        second = _read_until(fd, b">>> ")
        os.write(fd, b"quit\n")
        _read_until(fd, b"\n", timeout=30)
        _, status = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    ids = prompt_ids({"type": "conversation", "rounds": [["ask", "Hello"]]}, tok)
    want = tok.decode(reference_greedy(hf, ids), skip_special_tokens=True)
    answer = lambda raw: raw.decode().replace("\r\n", "\n").split("Hello\n", 1)[1].rsplit(">>> ", 1)[0].strip()
    assert want.strip().startswith(answer(first)) and answer(first)
    assert answer(second) == answer(first)  # after /reset the same prompt, the same greedy answer
