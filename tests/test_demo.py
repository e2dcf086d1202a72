"""demo.py: generation with the training templates, from a pipeline checkpoint or an HF dir.

Golden outputs: greedy decoding of a tiny random model (fixed seed) by our loop equals
transformers' own generate() on the same HF dir token for token, whichever source and backend.
"""
import contextlib
import json
import os
import pty
import select
import signal
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
        assert (r["stop_reason"] == "length") == (r["n_tokens"] == N_NEW and tok.eos_token_id not in want)


def test_bad_prompt_is_one_line(tiny, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(json.dumps({"type": "conversation", "rounds": [["ask", "a"], ["ans", "b"]]}) + "\n")
    proc = run_demo(["--model", str(tiny[1]), "--prompts", str(prompts)])
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "ask" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cuda_graphs_on_where_impossible_is_one_line(tiny):
    """--cuda-graphs on (auto is the default, off the eager path) on a machine or backend without the
    graph path: one error line naming the flag, before the model is loaded."""
    for extra in ([], ["--backend", "hf"]):
        proc = run_demo(["--model", str(tiny[0]), "--cuda-graphs", "on", *extra])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: demo.py: --cuda-graphs on needs") and proc.stderr.count("\n") == 1, proc.stderr
    proc = run_demo(["--model", str(tiny[0]), "--cuda-graphs", "sometimes"])
    assert proc.returncode == 2 and "--cuda-graphs" in proc.stderr and "Traceback" not in proc.stderr


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


@contextlib.contextmanager
def demo_in_terminal(*args: str, sigint=signal.SIG_DFL, env=None):
    """demo.py with `args` in a pseudo-terminal; yields the terminal's fd. The body ends the
    session; on leaving, demo.py must have exited 0 (it is killed if the body failed). `sigint`:
    the SIGINT disposition it starts with, set here rather than inherited from whatever runs the
    tests (a background job's is SIG_IGN)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    pid, fd = pty.fork()
    if pid == 0:  # child: the demo in the terminal
        os.chdir(ROOT)
        signal.signal(signal.SIGINT, sigint)  # SIG_IGN survives exec
        os.execve(sys.executable, [sys.executable, "demo.py", *args], env)
    try:
        yield fd
        _read_until(fd, b"\n", timeout=30)
        _, status = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_interactive_in_a_terminal(tiny, tok):
    """Drive demo.py through a pseudo-terminal: ask, read the streamed answer, /reset, ask again, quit."""
    hf, pp = tiny
    with demo_in_terminal("--model", str(pp), "--max-new-tokens", str(N_NEW)) as fd:
        _read_until(fd, b">>> ")
        os.write(fd, b"Hello\n")
        first = _read_until(fd, b">>> ")
        os.write(fd, b"/reset\n")
        assert b"history cleared" in _read_until(fd, b">>> ")
        os.write(fd, b"Hello\n")
        second = _read_until(fd, b">>> ")
        os.write(fd, b"quit\n")
    ids = prompt_ids({"type": "conversation", "rounds": [["ask", "Hello"]]}, tok)
    ref = reference_greedy(hf, ids)
    want = tok.decode(ref, skip_special_tokens=True)
    cut = f" [cut at {N_NEW} new tokens: --max-new-tokens]"
    answer = lambda raw: raw.decode().replace("\r\n", "\n").split("Hello\n", 1)[1].rsplit(">>> ", 1)[0].strip()
    assert (cut in answer(first)) == (tok.eos_token_id not in ref), "an answer cut by the limit is marked"
    assert want.strip().startswith(answer(first).replace(cut, "")) and answer(first)
    assert answer(second) == answer(first)  # after /reset the same prompt, the same greedy answer


# ----------------------------------------------------------------------------- KV cache, every family
FAMILIES = ["llama", "bloom", "mixtral", "baichuan", "baichuan_rope", "chatglm"]
LONG = 120  # new tokens: well past the prompt, so the cache holds most of the context


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    from models.tiny import make_tiny_hf_model, sample_texts

    extra = {"position_embedding": "alibi"} if request.param == "baichuan" else {}  # baichuan-13B: ALiBi
    family = request.param.removesuffix("_rope")  # baichuan_rope: Baichuan2-7B's rotary
    return request.param, make_tiny_hf_model(tmp_path_factory.mktemp(request.param) / "hf", family,
                                             sample_texts(DATA), seed=5, **extra)


def greedy_no_eos(lm, prompt, n, eos):
    """Greedy tokens through lm.next_logits with EOS suppressed (as transformers' min_new_tokens)."""
    lm.reset()
    logits, out = lm.next_logits(list(prompt)), []
    for _ in range(n):
        logits[eos] = float("-inf")
        out.append(int(torch.argmax(logits)))
        logits = lm.next_logits(out[-1:])
    return out


def test_kv_cache_greedy_equals_transformers_every_family(family_model):
    """Our cached generation = transformers' generate (with its cache) for LONG tokens, for llama,
    bloom (ALiBi), mixtral (MoE), baichuan (ALiBi and rotary variants, remote code) and chatglm (remote code);
    also with the layers split over three devices, and with the prompt fed in two chunks (the
    second one attends to the cached first at an offset)."""
    from transformers import AutoModelForCausalLM

    name, hf = family_model
    prompt = [1, 17, 43, 99, 5, 250, 11, 80, 33]
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=LONG, min_new_tokens=LONG, do_sample=False, pad_token_id=0, eos_token_id=2)
    want = ref[0, len(prompt):].tolist()
    lm = load_ours(hf, ["cpu"])
    got = greedy_no_eos(lm, prompt, LONG, eos=2)
    assert got == want, f"{name}: first difference at token {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
    split = load_ours(hf, ["cpu", "cpu", "cpu"])
    assert greedy_no_eos(split, prompt, 24, eos=2) == want[:24]
    lm.reset()
    whole = lm.next_logits(prompt + want[:10])
    lm.reset()
    lm.next_logits(prompt)
    torch.testing.assert_close(lm.next_logits(want[:10]), whole, rtol=1e-4, atol=1e-4)
    no_cache = lm.forward(torch.tensor([prompt + want[:10]]))[0, -1]
    torch.testing.assert_close(whole, no_cache.float(), rtol=1e-4, atol=1e-4)
    # the static cache's decode step (what a CUDA graph captures), run eagerly; capacity in steps
    # of 16 so the buffers outgrow it several times within the generation
    static = load_ours(hf, ["cpu"], static=True)
    static.CAPACITY_STEP = 16
    assert not static.graphs and greedy_no_eos(static, prompt, LONG, eos=2) == want
    assert static.cursor.capacity == 16 * -(-(len(prompt) + LONG) // 16)


def test_static_cache_chat_equals_eager_and_transformers(family_model):
    """A two-turn chat (the second prompt holds the first exchange) through the static cache (decode
    step run eagerly, buffers kept across generations and grown by the longer second prompt) answers
    what the eager cache and transformers' model answer, every family; CUDA graphs are off on CPU."""
    from transformers import AutoTokenizer

    name, hf = family_model
    tok = AutoTokenizer.from_pretrained(hf)
    static = load_ours(hf, ["cpu"], static=True)
    static.CAPACITY_STEP = 16
    lms = {"static": static, "eager": load_ours(hf, ["cpu"]), "hf": load_lm(hf, "hf")}
    assert lms["eager"].static is False and lms["eager"].graphs is False  # CPU default: the eager path
    answers = {}
    for key, lm in lms.items():
        chat = Chat(lm, tok, "conversation", SamplingConfig(max_new_tokens=24))
        answers[key] = [chat.ask("Hello").ids, chat.ask("Tell me more.").ids]
    assert answers["static"] == answers["eager"] == answers["hf"], name
    assert sum(map(len, answers["static"][1:])) > 0
    with pytest.raises(ValueError, match="one CUDA device"):
        load_ours(hf, ["cpu"], graphs=True)


def test_static_cache_sliding_window_equals_eager(family_model):
    """The sliding-window mask of the static decode step (built on the device from the position)
    equals the eager cache's, past the window."""
    name, hf = family_model
    if name != "mixtral":
        pytest.skip("mixtral has the sliding window")
    prompt = [1, 17, 43, 99, 5, 250, 11, 80, 33]
    runs = []
    for static in (False, True):
        lm = load_ours(hf, ["cpu"], static=static)
        for layer in lm.model.children():
            if hasattr(layer, "window"):
                layer.window = 8
        runs.append(greedy_no_eos(lm, prompt, 40, eos=2))
    assert runs[0] == runs[1]


def forced_logits(lm, prompt, tokens):
    """Logits of every step with `tokens` fed after the prompt (the same inputs for any path)."""
    lm.reset()
    return torch.stack([lm.next_logits(list(prompt))] + [lm.next_logits([t]) for t in tokens[:-1]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager_every_family(family_model, dtype):
    """On a GPU, the captured decode step (re-captured as the capacity grows in steps of 16, and
    across generations) against the eager cache, every family (mixtral, MoE: the static step run
    eagerly): fp32 greedy tokens equal; bf16 logits close along the same tokens (free-running
    bf16 tokens of a random model part at the first near-tie the two reduction orders break
    differently)."""
    name, hf = family_model
    prompt = [1, 17, 43, 99, 5, 250, 11, 80, 33]
    eager = load_ours(hf, ["cuda:0"], dtype, static=False, graphs=False)
    fast = load_ours(hf, ["cuda:0"], dtype, static=True, graphs=name != "mixtral")
    fast.CAPACITY_STEP = 16
    want = greedy_no_eos(eager, prompt, 60, eos=2)
    if dtype == "float32":
        assert greedy_no_eos(fast, prompt, 60, eos=2) == want, name
        longer = prompt + want[:30]  # a second generation: longer prompt, buffers grow, graph re-captured
        assert greedy_no_eos(fast, longer, 40, eos=2) == greedy_no_eos(eager, longer, 40, eos=2), name
    else:
        ref, got = forced_logits(eager, prompt, want), forced_logits(fast, prompt, want)
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max(), name


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored-by-the-starter"])
def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(tmp_path, sigint):
    """An answer interrupted with Ctrl-C in the terminal: the answer stops, the prompt comes back,
    the session goes on; Ctrl-C at the prompt does not end it. The answer is held after its first
    token (test hook, `[held]` on stderr) until the Ctrl-C ends it, so it cannot finish first. Also
    when the demo was started with SIGINT ignored (as a background job's starter passes it on):
    in the foreground of its terminal it takes Ctrl-C back (Python alone would leave it ignored
    and the answer would run on to --max-new-tokens)."""
    from models.tiny import make_tiny_hf_model, sample_texts

    hf = make_tiny_hf_model(tmp_path / "hf", "llama", sample_texts(DATA), seed=3, max_position_embeddings=8192)
    with demo_in_terminal("--model", str(hf), "--max-new-tokens", "4000", sigint=sigint,
                          env={"PPLLM_TEST_HOLD_ANSWER": "1"}) as fd:
        _read_until(fd, b">>> ")
        os.write(fd, b"Hello\n")
        streamed = _read_until(fd, b"[held]")  # the answer is being written, and waits
        os.write(fd, b"\x03")  # Ctrl-C, as the terminal sends it (SIGINT to the foreground process)
        stopped = _read_until(fd, b">>> ")
        assert b"[stopped" in stopped and b"Traceback" not in streamed + stopped
        os.write(fd, b"\x03")
        assert b"/quit leaves" in _read_until(fd, b">>> ")
        os.write(fd, b"/quit\n")


def test_ctrl_c_anywhere_in_an_exchange_keeps_the_session(tok):
    """A Ctrl-C during the prompt's prefill stops that answer (not kept); one that lands outside the
    generation (as the answer ends, while a command replies) returns to the prompt too: it used to
    escape the loop and end the demo (exit 130). An answer that had ended before it is kept."""
    from engine.inference.generate import interactive

    class Interrupted(FakeLM):
        first = True

        def next_logits(self, new_ids):
            if self.first:  # Ctrl-C just after Enter: during the prefill
                self.first = False
                raise KeyboardInterrupt
            return super().next_logits(new_ids)

    word = tok("hello", add_special_tokens=False)["input_ids"]
    chat = Chat(Interrupted(word * 3), tok, "conversation", SamplingConfig(max_new_tokens=3))
    lines, out = iter(["Hi", "Hi", "/help", "Hi", "/quit"]), []
    interrupt_at = {" [cut at", "commands:"}  # while the cut marker / the help text is written

    def write(text):
        hit = next((m for m in interrupt_at if text.startswith(m)), None)
        if hit:
            interrupt_at.discard(hit)
            raise KeyboardInterrupt
        out.append(text)

    interactive(chat, read=lambda prompt: next(lines), write=write)
    text = "".join(out)
    assert text.count("[stopped; this exchange is not kept]") == 1 and not interrupt_at, text
    assert [r[0] for r in chat.rounds] == ["ask", "ans", "ask", "ans"], chat.rounds  # 2nd and 4th line kept


# ----------------------------------------------------------------------------- chat templates in the demo
@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    from tests.tokenizer_util import make_chat_tokenizer

    return make_chat_tokenizer(tmp_path_factory.mktemp("chatml"), "chatml")


def test_chat_template_is_the_default_and_its_end_of_turn_stops(chatml):
    """auto: prompts are the tokenizer's chat template (system prompt included), the answer stops
    at <|im_end|> (stop_reason eos), and the next turn renders the history through the template."""
    tok = chatml
    word = tok("Paris", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    lm = FakeLM(word + [im_end] + word)
    chat = Chat(lm, tok, "conversation", SamplingConfig(max_new_tokens=20), template="auto", system="Be brief.")
    g = chat.ask("Capital of France?")
    assert (g.text, g.stop_reason) == ("Paris", "eos")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert lm.prompts[-1] == tok(want, add_special_tokens=False)["input_ids"], "no BOS in front, no ### layout"
    lm.pos = 0
    chat.ask("And Italy?")
    messages += [{"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And Italy?"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert lm.prompts[-1] == tok(want, add_special_tokens=False)["input_ids"]


def test_chat_template_api_call_gets_a_tool_message(chatml):
    """Under a chat template the api call ends with the end-of-turn token; the tool's result goes
    into a tool message and the model answers after it; the history keeps the ans-api structure."""
    tok = chatml
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    call = "Thought: Look.\nAction: getWeather\nAction Input: Paris"
    lm = FakeLM(tok(call, add_special_tokens=False)["input_ids"] + [im_end]
                + tok("Final Answer: sunny", add_special_tokens=False)["input_ids"] + [im_end])
    chat = Chat(lm, tok, "conver_has_api", SamplingConfig(max_new_tokens=60), template="auto",
                api_desc="getWeather: weather")
    g = chat.ask("Weather?", observe=lambda text: "18 C")
    assert g.text == call + " 18 C\nFinal Answer: sunny" and g.stop_reason == "eos"
    messages = [{"role": "user", "content": "API:\ngetWeather: weather\n\nWeather?"},
                {"role": "assistant", "content": call}, {"role": "tool", "content": "18 C"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert lm.prompts[1] == tok(want, add_special_tokens=False)["input_ids"]
    assert chat.rounds[-1] == ["ans-api", {"actions": [{"inner_thought": "Look.", "api_name": "getWeather",
                                                        "api_param": "Paris", "api_res": "18 C"}], "ans": "sunny"}]


def test_chat_template_greedy_equals_transformers(tmp_path, chatml):
    """A tiny llama with a ChatML tokenizer: our cached greedy answer to the chat-template prompt
    = transformers' generate on apply_chat_template's ids."""
    from models.tiny import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "hf", "llama", seed=4, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    chatml.save_pretrained(hf)  # replaces the sentencepiece tokenizer (same vocab size)
    lm = load_lm(hf)
    tok = load_tokenizer_of(hf)
    ids = prompt_ids({"type": "instruct", "instruct": "Name a colour."}, tok, "auto")
    assert ids == tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
    g = generate(lm, tok, ids, SamplingConfig(max_new_tokens=40))
    assert g.ids == reference_greedy(hf, ids, 40)[:len(g.ids)] and (len(g.ids) == 40 or g.stop_reason == "eos")


def load_tokenizer_of(hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf)


# ----------------------------------------------------------------------------- decode step cost
def test_step_memo_is_recomputed_every_static_decode_step(tiny):
    """The rotary tables all layers share within a step (OurLM.step) are computed anew each step:
    the static decode step's position is one tensor refilled in place, so tables kept from the
    previous step would rotate every later token at a stale position."""
    from models.positions import Rotary

    hf, _ = tiny
    lm = load_ours(hf, ["cpu"], static=True)
    prompt, tokens = [1, 17, 43, 99, 5], [250, 11, 80, 33, 7]
    rotary = next(m for m in lm.model.modules() if isinstance(m, Rotary))
    lm.reset()
    lm.reserve(len(prompt) + len(tokens))
    lm.next_logits(prompt)
    pos = lm.cursor.pos("cpu")
    for i, t in enumerate(tokens):
        got = lm.next_logits([t])
        assert lm.cursor.pos("cpu") is pos and int(pos) == len(prompt) + i  # the same tensor, advanced
        (cos, sin), = [v for k, v in lm.step.items() if k[0] == rotary.spec]  # one set of tables for all layers
        want = rotary.tables(torch.tensor([[len(prompt) + i]]), torch.float32)
        torch.testing.assert_close((cos[:, 0], sin[:, 0]), want)
        no_cache = lm.forward(torch.tensor([prompt + tokens[:i + 1]]))[0, -1].float()
        torch.testing.assert_close(got, no_cache, rtol=1e-4, atol=1e-4)


def test_v_copy_only_with_grad_under_compile():
    """Attention copies v out of the fused q/k/v output only when autograd would keep it (training);
    torch.compile guards on grad mode, so a compiled training block still traces the copy."""
    from models import llama
    from models.attention import AttnOptions

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    args = llama.Args.from_hf_config(llama.tiny_hf_config())
    attn = torch.compile(llama.Attention(args, AttnOptions()), backend=backend, dynamic=False)
    x, pos = torch.randn(1, 8, args.hidden_size), torch.arange(8)[None]
    attn(x, pos, None)
    with torch.no_grad():
        attn(x, pos, None)
    assert ["contiguous" in code for code in graphs] == [True, False]


def test_decode_step_ops_not_more_than_transformers():
    """One eager decode step dispatches no more aten ops, and no more that write memory, than
    transformers' forward with its cache (bench_generate --count-ops; the host-bound cost of GPU
    decoding)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import bench_generate as bg

    bg.SHAPES["narrow2"] = dict(bg.SHAPES["narrow32"], num_hidden_layers=2)
    a = argparse.Namespace(model=None, shape="narrow2", device="cpu", dtype="fp32")
    hf = bg.hf_model(a)
    counts = bg.count_ops({"ours": bg.our_lm(hf, a)}, hf, list(range(3, 35)))
    for kind in ("ops_per_decode_step", "writing_ops_per_decode_step"):  # all; those that launch kernels on a GPU
        assert 0 < counts[kind]["eager"] <= counts[kind]["transformers"], counts


def test_decode_step_compiles_whole_and_equals_eager(family_model):
    """The static decode step that the CUDA-graph path compiles (inductor) before capturing it is
    one graph for dynamo, no break, in every rope family (ALiBi families capture it uncompiled),
    and the traced step (aot_eager here: the trace, not inductor's kernels) gives the eager step's
    logits token after token."""
    import torch._dynamo

    name, hf = family_model
    if name in ("bloom", "baichuan", "mixtral"):
        pytest.skip("ALiBi (bloom, baichuan-13B) and MoE routing keep the uncompiled step")
    prompt, tokens = [1, 17, 43, 99, 5], [250, 11, 80, 33, 7, 19]
    lms = [load_ours(hf, ["cpu"], static=True) for _ in range(2)]
    for lm in lms:
        lm.reset()
        lm.reserve(len(prompt) + len(tokens) + 1)
        lm.next_logits(prompt)
        lm.next_logits([3])  # the decode step's inputs exist from here on
    traced, eager = lms
    explained = torch._dynamo.explain(traced._step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)
    torch._dynamo.reset()
    step = torch.compile(traced._step, backend="aot_eager", fullgraph=True, dynamic=False)
    for i, t in enumerate(tokens):
        for lm in lms:
            lm.cursor.set_position(len(prompt) + 1 + i)
            lm._token.fill_(t)
        torch.testing.assert_close(step(), eager._step(), rtol=1e-5, atol=1e-5)
