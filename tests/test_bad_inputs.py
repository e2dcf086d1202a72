"""Bad inputs through the user-facing tools (`python train_ds.py`, `python convert_model.py`).

Every case must exit non-zero with ONE line on stderr (`error: ...`) naming the file / key /
index, and leave every existing output byte-for-byte intact (hash snapshot of the output dirs
before and after). Cases run as subprocesses, a few at a time; almost all fail during validation,
before DeepSpeed builds anything. Finer-grained checks of the same validators live in
tests/test_config.py, tests/test_convert.py and tests/test_data_samples.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.dist import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"


@dataclass
class Case:
    id: str
    argv: list[str]  # tool and arguments, run in the repo root
    expect: list[str]  # substrings the error line must contain (file / key / index)
    env: dict = field(default_factory=dict)
    late: bool = False  # fails after training started: progress output may precede the error line


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(case: Case) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **case.env}
    return subprocess.run([sys.executable, *case.argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def build_cases(w: Path, hf: Path, pp: Path, ckpt: Path, exported: Path) -> list[Case]:
    """Write each case's inputs under w and return the cases."""
    good_data = w / "good.jsonl"
    shutil.copy(EXAMPLES / "pretrain.jsonl", good_data)
    base = {"model_path": str(pp), "data_path": [str(good_data)], "save_path": str(ckpt), "max_seq_len": 64,
            "max_steps": 2, "packing": True, "n_epochs": 5,
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": [6]},
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    cases: list[Case] = []

    def train(id, expect, text=None, env=None, late=False, extra_argv=(), drop=(), **over):
        path = w / f"{id}.yml"
        raw = {k: v for k, v in {**base, "cache_dir": str(w / f"cache-{id}"), **over}.items() if k not in drop}
        path.write_text(text if text is not None else yaml.safe_dump(raw))
        cases.append(Case(id, ["train_ds.py", "--config", str(path), *extra_argv], expect, env or {}, late))

    def data(id, content: str, suffix=".jsonl", expect=()):
        f = w / f"{id}{suffix}"
        f.write_text(content)  # fails after taking save_path's lock: a save_path of its own (cases run in parallel)
        train(id, [f.name, *expect], data_path=[str(good_data), str(f)], save_path=str(w / f"save-{id}"))

    def convert(id, expect, *args):
        cases.append(Case(id, ["convert_model.py", *map(str, args)], expect))

    def hf_variant(name, mutate=None) -> Path:
        d = w / name
        shutil.copytree(hf, d)
        if mutate:
            mutate(d)
        return d

    def pp_variant(name, mutate) -> Path:
        d = w / name
        shutil.copytree(pp, d)
        mutate(d / "global_step0")
        return d

    # ---- config: syntax, keys, types (fail while parsing)
    train("yaml-syntax", ["yaml-syntax.yml", "line 3"], text="model_path: x\ndata_path: [a, b\nsave_path: y\n")
    train("top-not-mapping", ["top-not-mapping.yml", "mapping"], text="- model_path\n- data_path\n")
    train("unknown-key", ["'max_seq_lne'", "did you mean 'max_seq_len'"], max_seq_lne=64)
    train("unknown-nested-key", ["'model_topo.part'"], model_topo={"part": [6]})
    train("wrong-type", ["'max_seq_len'", "'long'"], max_seq_len="long")
    train("wrong-type-list", ["'data_weights'"], data_weights="heavy")
    train("missing-required", ["'data_path'"], drop=("data_path",))
    train("batch-not-int", ["'train_micro_batch_size_per_gpu'"], train_micro_batch_size_per_gpu=1.5)
    train("bad-override", ["--set", "max_steps"], extra_argv=("--set", "max_steps"))
    train("override-typo", ["'max_stpes'"], extra_argv=("--set", "max_stpes=3"))
    # ---- cross-field rules (fail in validate, before the model is built)
    train("parts-sum", ["model_topo.parts [5]", "6 pipeline layers"],
          model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": [5]})
    train("parts-stages", ["model_topo.parts has 2 stages", "pipe=1"],
          model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": [3, 3]})
    train("dims-world", ["dims [2, 1]", "1 were launched"],
          model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]})
    train("axes", ["model_topo.process_topology.axes"],
          model_topo={"process_topology": {"axes": ["pipe", "model"], "dims": [1, 1]}})
    train("batch-mismatch", ["train_batch_size 5", "= 4"], train_batch_size=5)
    train("optimizer-type", ["optimizer.type 'AdamX'", "one of AdamW, Adam, Lion"], optimizer={"type": "AdamX"})
    train("zero3-under-pp", ["zero_optimization.stage 3"], zero_optimization={"stage": 3})
    train("bf16-and-fp16", ["bf16 and fp16"], bf16={"enabled": True}, fp16={"enabled": True})
    train("nonfinite-policy", ["on_nonfinite_loss", "'ignore'"], on_nonfinite_loss="ignore")
    train("negative-keep-last", ["'keep_last'", "-1"], keep_last=-1)
    train("data-weights-count", ["data_weights has 2 entries for 1"], data_weights=[1.0, 2.0])
    train("max-seq-len-zero", ["'max_seq_len'", ">= 1"], max_seq_len=0)
    # ---- paths and models
    train("model-path-missing", ["model_path", str(w / "nowhere")], model_path=str(w / "nowhere"))
    train("data-path-missing", ["data_path[1]", "missing.jsonl"], data_path=[str(good_data), str(w / "missing.jsonl")])
    train("resume-true-empty", ["resume is true", "no checkpoint"], resume=True, save_path=str(w / "empty-save"))
    no_config = hf_variant("hf-no-config", lambda d: (d / "config.json").unlink())
    train("model-no-config", ["hf-no-config", "config.json"], model_path=str(no_config))
    gpt2 = hf_variant("hf-gpt2", lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "gpt2"})))
    train("wrong-family", ["config.json", "gpt2"], model_path=str(gpt2))
    no_layer = pp_variant("pp-no-layer", lambda t: (t / "layer_03-model_states.pt").unlink())
    train("layer-file-missing", ["layer_03-model_states.pt", "missing"], model_path=str(no_layer),
          save_path=str(w / "save-layer-missing"))
    trunc = pp_variant("pp-truncated", lambda t: (t / "layer_02-model_states.pt").write_bytes(
        (t / "layer_02-model_states.pt").read_bytes()[:200]))
    train("layer-file-truncated", ["layer_02-model_states.pt", "cannot be read"], model_path=str(trunc),
          save_path=str(w / "save-layer-truncated"))
    smaller = hf_variant("hf-2-blocks", lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "num_hidden_layers": 2})))
    other = w / "ckpt-other-model"  # fails after taking save_path's lock: a copy of its own (cases run in parallel)
    shutil.copytree(ckpt, other)
    train("checkpoint-of-another-model", [str(other / "global_step2"), "6 layers", "with 4"], model_path=str(smaller),
          from_scratch=True, save_path=str(other),
          model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": "auto"})
    damaged = w / "ckpt-damaged"
    shutil.copytree(ckpt, damaged)
    layer = damaged / "global_step2" / "layer_01-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:1000])
    train("checkpoint-truncated", ["layer_01-model_states.pt", "1000 bytes", "truncated"], save_path=str(damaged))
    train("nonfinite-loss", ["step 1: loss is nan", "not applied"], env={"PPLLM_TEST_NAN_AT_STEP": "1"}, late=True,
          save_path=str(w / "nan-save"))
    # ---- data files
    data("jsonl-broken-line", '{"type": "pretrain", "text": "a b c"}\n{"type": "pretrain", "text": \n', expect=["1"])
    data("json-array-broken", '[{"type": "pretrain", "text": "a b c"}, {"type": ', suffix=".json")
    data("sample-missing-field", '{"type": "instruct", "instruct": "say hi"}\n', expect=["output"])
    data("sample-wrong-type", '{"type": "instruct", "instruct": "say hi", "output": 7}\n', expect=["output"])
    data("sample-unknown-type", '{"type": "essay", "text": "a b c"}\n', expect=["essay"])
    data("sample-not-object", '["pretrain", "a b c"]\n')
    data("data-empty-file", "", expect=["data_path[1]", "no samples"])
    # ---- convert_model.py
    convert("hg2pp-no-config", ["hf-no-config", "config.json"], "hg_to_pp", "--input-path", no_config,
            "--save-path", w / "out-a")
    no_tok = hf_variant("hf-no-tokenizer", lambda d: [f.unlink() for f in d.iterdir() if "token" in f.name])
    convert("hg2pp-no-tokenizer", ["hf-no-tokenizer", "tokenizer"], "hg_to_pp", "--input-path", no_tok,
            "--save-path", w / "out-b")
    convert("hg2pp-wrong-family", ["config.json", "gpt2"], "hg_to_pp", "--input-path", gpt2, "--save-path", w / "out-c")
    bad_json = hf_variant("hf-bad-json", lambda d: (d / "config.json").write_text('{"model_type": "llama",'))
    convert("hg2pp-config-not-json", ["hf-bad-json", "config.json", "not valid JSON"], "hg_to_pp", "--input-path",
            bad_json, "--save-path", w / "out-d")
    convert("hg2pp-shape-mismatch", ["hf-wide", "shape"], "hg_to_pp", "--input-path",
            hf_variant("hf-wide", lambda d: (d / "config.json").write_text(json.dumps(
                {**json.loads((d / "config.json").read_text()), "intermediate_size": 999}))),
            "--save-path", w / "out-e")
    convert("hg2pp-no-weights", ["hf-no-weights", "no weights"], "hg_to_pp", "--input-path",
            hf_variant("hf-no-weights", lambda d: [f.unlink() for f in d.glob("*.safetensors")]),
            "--save-path", w / "out-f")
    convert("hg2pp-output-exists", [str(pp), "already exists"], "hg_to_pp", "--input-path", hf, "--save-path", pp)
    convert("pp2hg-layer-missing", ["layer_03-model_states.pt", "missing"], "pp_to_hg", "--input-path", no_layer,
            "--save-path", w / "out-g")
    convert("pp2hg-layer-truncated", ["layer_02-model_states.pt"], "pp_to_hg", "--input-path", trunc,
            "--save-path", w / "out-h")
    convert("pp2hg-no-such-tag", ["global_step99"], "pp_to_hg", "--input-path", pp, "--save-path", w / "out-i",
            "--tag", "global_step99")
    convert("pp2hg-another-model", ["layer_", "another model"], "pp_to_hg", "--input-path",
            pp_variant("pp-other-config", lambda t: (t.parent / "hf" / "config.json").write_text(json.dumps(
                {**json.loads((t.parent / "hf" / "config.json").read_text()), "hidden_size": 32}))),
            "--save-path", w / "out-j")
    convert("pp2hg-output-exists", [str(exported), "already exists"], "pp_to_hg", "--input-path", pp,
            "--save-path", exported)
    return cases


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    from engine.checkpoints.convert import hf_to_pp, pp_to_hg
    from models.tiny import make_tiny_hf_model, sample_texts

    root = tmp_path_factory.mktemp("bad")
    hf = make_tiny_hf_model(root / "hf", "llama", sample_texts([str(p) for p in EXAMPLES.glob("*.json*")]))
    pp = hf_to_pp(hf, root / "pp")
    exported = pp_to_hg(pp, root / "exported")
    ckpt = root / "ckpt"  # an existing training output (world size 1, 2 steps)
    cfg = root / "good.yml"
    cfg.write_text(yaml.safe_dump({
        "model_path": str(pp), "data_path": [str(EXAMPLES / "pretrain.jsonl")], "save_path": str(ckpt),
        "max_seq_len": 64, "max_steps": 2, "packing": True, "n_epochs": 5,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": [6]},
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}))
    good = run_case(Case("good", ["train_ds.py", "--config", str(cfg)], []))
    assert good.returncode == 0, good.stderr[-3000:]
    work = root / "cases"
    work.mkdir()
    cases = build_cases(work, hf, pp, ckpt, exported)
    outputs = [hf, pp, ckpt, exported, *(p for p in work.iterdir() if p.is_dir())]
    before = {str(d): digest(d) for d in outputs}
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip([c.id for c in cases], pool.map(run_case, cases)))
    after = {str(d): digest(d) for d in outputs}
    return {c.id: (c, results[c.id]) for c in cases}, before, after, work


def test_at_least_30_cases_through_the_tools(outcome):
    cases, *_ = outcome
    assert len(cases) >= 30


def test_existing_outputs_are_untouched(outcome):
    _, before, after, work = outcome
    for d in before:
        changed = sorted(set(before[d].items()) ^ set(after[d].items()))
        assert not changed, f"{d}: {changed[:5]}"
    assert not list(work.glob("out-*")) and not list(work.glob(".out-*"))  # no partial conversion outputs
    nan_save = work / "nan-save"  # the non-finite run stopped before writing any checkpoint
    assert not (nan_save / "latest").exists() and not list(nan_save.glob("global_step*"))


def problem(case: Case, proc) -> str | None:
    if proc.returncode == 0:
        return f"exited 0\n{proc.stdout[-1500:]}"
    if "Traceback" in proc.stderr:
        return f"traceback:\n{proc.stderr[-2500:]}"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    if len(errors) != 1 or not (case.late or len(lines) == 1):
        return f"not one error line:\n{proc.stderr[-2500:]}"
    missing = [part for part in case.expect if part not in errors[0]]
    return f"{missing} not in {errors[0]!r}" if missing else None


def test_each_case_fails_with_one_line_naming_the_problem(outcome):
    cases, *_ = outcome
    bad = {cid: p for cid, (case, proc) in cases.items() if (p := problem(case, proc))}
    assert not bad, "\n\n".join(f"[{cid}] {p}" for cid, p in bad.items())
