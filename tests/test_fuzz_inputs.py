"""Malformed user inputs, generated class by class, through the real CLIs' `main(argv)`.

Every input a user hands us — the YAML config and its keys, data files, HF model dirs
(config.json, safetensors headers, weight index, tokenizer), checkpoint dirs (`latest`, tags,
output paths) and the flags of train_ds.py / train_ds_zero.py / convert_model.py / demo.py — is
mutated here (wrong type, negative, unknown value, missing, bad encoding, truncated, trailing
garbage, deep nesting, ...). Each case must exit 2 with exactly one stderr line `error: ...`
naming the file (and the key / line / sample index / field where there is one), print no
traceback, and create or change no output. All cases run in this one process (`main(argv)` is
the code path of the command line; tests/test_bad_inputs.py runs a set of them as subprocesses).
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import importlib
import io
import json
import os
import shutil
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"


@dataclass
class Case:
    tool: str  # module with main(argv): train_ds, train_ds_zero, convert_model, demo
    argv: list[str]
    expect: tuple[str, ...]  # substrings of the error line: file, key / line / sample / field
    absent: tuple[Path, ...] = ()  # outputs that must not be created
    unchanged: tuple[Path, ...] = ()  # existing outputs that must stay byte-identical


SPECS: dict[str, typing.Callable[["Workspace"], Case]] = {}  # case id -> builder (ids known at collection)


def case(cid: str):
    def register(fn):
        assert cid not in SPECS, cid
        SPECS[cid] = fn
        return fn
    return register


# ----------------------------------------------------------------------------- workspace
class Workspace:
    """Inputs shared by all cases: the tiny HF dir and pipeline checkpoint (tests/conftest.py), one
    good data file, a valid training config, and helpers that write one mutated input per case."""

    def __init__(self, root: Path, pp: Path):
        self.root, self.pp, self.hf = root, pp, pp.parent / "hf"
        self.good = root / "good.jsonl"
        shutil.copy(EXAMPLES / "pretrain.jsonl", self.good)
        self.cache = root / "cache"  # shared tokenized-data cache: the good file is tokenized once
        self.base = {"model_path": str(pp), "data_path": [str(self.good)], "max_seq_len": 64, "max_steps": 1,
                     "packing": True, "n_epochs": 5, "cache_dir": str(self.cache),
                     "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": [6]},
                     "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}

    def path(self, cid: str, name: str) -> Path:
        d = self.root / cid
        d.mkdir(exist_ok=True)
        return d / name

    def out(self, cid: str) -> Path:
        return self.root / cid / "out"

    def config(self, cid: str, text: str | bytes | None = None, drop=(), **over) -> str:
        """A config file: the valid base with `over` applied (dotted keys reach into mappings)."""
        raw = copy.deepcopy(self.base)
        raw["save_path"] = str(self.out(cid))
        for key, value in over.items():
            node, *parts = raw, *key.split("__")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        for key in drop:
            raw.pop(key)
        path = self.path(cid, "config.yml")
        data = text if text is not None else yaml.safe_dump(raw)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    def train(self, cid: str, expect, *flags, tool="train_ds", **over) -> Case:
        return Case(tool, ["--config", self.config(cid, **over), *flags], tuple(expect), absent=(self.out(cid),))

    def data(self, cid: str, content: bytes, expect, suffix=".jsonl") -> Case:
        f = self.path(cid, f"{cid}{suffix}")
        f.write_bytes(content)
        return self.train(cid, [f.name, *expect], data_path=[str(self.good), str(f)])

    def hf_variant(self, cid: str, mutate) -> Path:
        d = self.root / cid / "hf"
        shutil.copytree(self.hf, d)
        mutate(d)
        return d

    def pp_variant(self, cid: str, mutate) -> Path:
        d = self.root / cid / "pp"
        shutil.copytree(self.pp, d)
        mutate(d)
        return d

    def convert(self, cid: str, direction: str, src: Path, expect, *flags) -> Case:
        out = self.out(cid)
        return Case("convert_model", [direction, "--input-path", str(src), "--save-path", str(out), *flags],
                    tuple(expect), absent=(out,))

    def demo(self, cid: str, expect, *flags, model: Path | None = None) -> Case:
        out = self.path(cid, "answers.jsonl")
        prompts = self.path(cid, "prompts.jsonl")
        if not prompts.exists():
            prompts.write_text(json.dumps({"type": "instruct", "instruct": "say hi"}) + "\n")
        argv = ["--model", str(model or self.pp), "--prompts", str(prompts), "--output", str(out), *flags]
        return Case("demo", argv, tuple(expect), absent=(out,))


def edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


# ----------------------------------------------------------------------------- config: syntax and encoding
@case("cfg-not-utf8")
def _(w):
    return Case("train_ds", ["--config", w.config("cfg-not-utf8", text=b"max_steps: 1\nmodel_path: \xff\xfe\n")],
                ("config.yml", "line 2", "0xff", "UTF-8"))


@case("cfg-latin1-comment")
def _(w):
    text = yaml.safe_dump({**w.base, "save_path": str(w.out("cfg-latin1-comment"))}).encode()
    return Case("train_ds", ["--config", w.config("cfg-latin1-comment", text=b"# caf\xe9\n" + text)],
                ("config.yml", "line 1", "UTF-8"), absent=(w.out("cfg-latin1-comment"),))


for i, bad in enumerate(["model_path: x\ndata_path: [a, b\nsave_path: y\n", "a: b: c\n", "key: 'unclosed\n",
                         "- a\n b: c\n", "\tmax_steps: 1\n"]):
    case(f"cfg-yaml-syntax-{i}")(lambda w, i=i, bad=bad: Case(
        "train_ds", ["--config", w.config(f"cfg-yaml-syntax-{i}", text=bad)], ("config.yml", "YAML")))

for name, text in {"list": "- model_path\n- data_path\n", "scalar": "just text\n", "number": "42\n"}.items():
    case(f"cfg-top-{name}")(lambda w, name=name, text=text: Case(
        "train_ds", ["--config", w.config(f"cfg-top-{name}", text=text)], ("config.yml", "mapping")))


@case("cfg-duplicate-key")
def _(w):
    text = yaml.safe_dump({**w.base, "save_path": str(w.out("cfg-duplicate-key"))}) + "max_seq_len: 128\n"
    return Case("train_ds", ["--config", w.config("cfg-duplicate-key", text=text)],
                ("config.yml", "'max_seq_len' given twice"), absent=(w.out("cfg-duplicate-key"),))


@case("cfg-duplicate-nested-key")
def _(w):
    text = yaml.safe_dump({**w.base, "save_path": str(w.out("cfg-duplicate-nested-key"))}) + \
        "zero_optimization: {stage: 1, stage: 0}\n"
    return Case("train_ds", ["--config", w.config("cfg-duplicate-nested-key", text=text)],
                ("config.yml", "'stage' given twice"), absent=(w.out("cfg-duplicate-nested-key"),))


@case("cfg-deep-nesting")
def _(w):
    return Case("train_ds", ["--config", w.config("cfg-deep-nesting", text="model_topo: " + "[" * 5000 + "]" * 5000)],
                ("config.yml",))


@case("cfg-empty-file")
def _(w):
    return Case("train_ds", ["--config", w.config("cfg-empty-file", text="")], ("config.yml", "model_path"))


# ----------------------------------------------------------------------------- config: every key, generated
def _fields():
    """(key with '__' for '.', type) of every config key we own."""
    from engine.config import owned_fields

    return [(key.replace(".", "__"), tp) for key, tp, _ in owned_fields()]


def _wrong_type(tp):
    """A YAML value no key of type `tp` accepts."""
    import types

    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    if args & {dict}:
        return ["not", "a", "mapping"]
    if any(typing.get_origin(a) is list for a in args):
        return {"not": "a list"}
    if args & {str}:
        return ["not", "a", "string"]
    return "maybe" if args & {bool} else "many"


ENUMS = {"prompt_template": "fancy", "on_nonfinite_loss": "ignore", "resume": "sometimes", "use_grad_ckpt": "partial",
         "model_topo__parts": "balanced"}

for key, tp in _fields():
    dotted = key.replace("__", ".")
    case(f"key-{dotted}-wrong-type")(lambda w, key=key, tp=tp, dotted=dotted: w.train(
        f"key-{dotted}-wrong-type", ["config.yml", f"'{dotted}'"], **{key: _wrong_type(tp)}))
    if tp in (int, float):
        case(f"key-{dotted}-negative")(lambda w, key=key, dotted=dotted: w.train(
            f"key-{dotted}-negative", ["config.yml", dotted, "-1"], **{key: -1}))
    if key in ENUMS:
        case(f"key-{dotted}-unknown-value")(lambda w, key=key, dotted=dotted: w.train(
            f"key-{dotted}-unknown-value", ["config.yml", dotted, ENUMS[key]], **{key: ENUMS[key]}))

# DeepSpeed's keys: the ones we read must have the shape we read; values DeepSpeed checks are named
DS_BAD = {
    "bf16": (True, "'bf16'"), "fp16": ("on", "'fp16'"), "zero_optimization": (1, "'zero_optimization'"),
    "zero_optimization__stage": ("x", "zero_optimization.stage"), "bf16__enabled": ("yes", "bf16.enabled"),
    "zero_optimization__offload_optimizer": ("cpu", "zero_optimization.offload_optimizer"),
    "gradient_clipping": ("x", "gradient_clipping"), "optimizer": ("AdamW", "optimizer"),
    "optimizer__type": ("SGD", "optimizer.type"), "optimizer__params__lr": ("fast", "lr"),
    "optimizer__params__betas": ([0.9], "optimizer.params.betas"), "optimizer__params__eps": ("x", "eps"),
    "optimizer__params__weight_decay": (-0.1, "weight_decay"), "scheduler": ("WarmupLR", "scheduler"),
    "scheduler__type": ("Fancy", "scheduler.type"), "train_micro_batch_size_per_gpu": ("two", "train_micro_batch"),
    "gradient_accumulation_steps": (-1, "gradient_accumulation_steps"), "train_batch_size": (5, "train_batch_size"),
    "data_types__grad_accum_dtype": ("fp8", "grad_accum_dtype"),
}
for key, (value, expect) in DS_BAD.items():
    dotted = key.replace("__", ".")
    case(f"ds-{dotted}")(lambda w, key=key, value=value, expect=expect, dotted=dotted: w.train(
        f"ds-{dotted}", ["config.yml", expect], **{key: value}))

for name, (weights, expect) in {"negative": ([-1.0], "data_weights[0]"), "nan": ([float("nan")], "data_weights[0]"),
                                "inf": ([float("inf")], "data_weights[0]"), "all-zero": ([0.0], "data_weights"),
                                "count": ([1.0, 2.0], "data_weights")}.items():
    case(f"data-weights-{name}")(lambda w, name=name, weights=weights, expect=expect: w.train(
        f"data-weights-{name}", ["config.yml", expect], data_weights=weights))


# ----------------------------------------------------------------------------- config: paths
@case("path-model-missing")
def _(w):
    return w.train("path-model-missing", ["model_path", "nowhere"], model_path=str(w.root / "nowhere"))


@case("path-model-is-file")
def _(w):
    return w.train("path-model-is-file", ["model_path", "good.jsonl"], model_path=str(w.good))


@case("path-model-empty")
def _(w):
    return w.train("path-model-empty", ["'model_path'", "empty"], model_path="")


@case("path-data-missing")
def _(w):
    return w.train("path-data-missing", ["data_path[1]", "missing.jsonl"], data_path=[str(w.good),
                                                                                       str(w.root / "missing.jsonl")])


@case("path-data-is-dir")
def _(w):
    return w.train("path-data-is-dir", ["data_path[0]"], data_path=[str(w.root)])


@case("path-data-empty-list")
def _(w):
    return w.train("path-data-empty-list", ["'data_path'"], data_path=[])


@case("path-eval-missing")
def _(w):
    return w.train("path-eval-missing", ["eval_data_path[0]", "held-out.jsonl"],
                   eval_data_path=str(w.root / "held-out.jsonl"))


@case("path-save-is-file")
def _(w):
    return w.train("path-save-is-file", ["save_path", "good.jsonl", "is a file"], save_path=str(w.good))


@case("path-save-under-file")
def _(w):
    return w.train("path-save-under-file", ["save_path", "good.jsonl", "is a file"], save_path=str(w.good / "run"))


@case("path-cache-is-file")
def _(w):
    return w.train("path-cache-is-file", ["cache_dir", "is a file"], cache_dir=str(w.good))


# ----------------------------------------------------------------------------- CLI flags
@case("flag-world-size-0")
def _(w):
    return w.train("flag-world-size-0", ["--world-size", "0"], "--dry-run", "--world-size", "0")


@case("flag-world-size-negative")
def _(w):
    return w.train("flag-world-size-negative", ["--world-size", "-2"], "--dry-run", "--world-size", "-2")


@case("flag-world-size-text")
def _(w):
    return w.train("flag-world-size-text", ["--world-size", "two"], "--dry-run", "--world-size", "two")


@case("flag-gpu-mem-zero")
def _(w):
    return w.train("flag-gpu-mem-zero", ["--gpu-mem-gib"], "--dry-run", "--gpu-mem-gib", "0")


@case("flag-set-no-equals")
def _(w):
    return w.train("flag-set-no-equals", ["--set", "max_steps"], "--set", "max_steps")


@case("flag-set-bad-yaml")
def _(w):
    return w.train("flag-set-bad-yaml", ["--set", "model_topo.parts"], "--set", "model_topo.parts=[1,")


@case("flag-set-typo")
def _(w):
    return w.train("flag-set-typo", ["'max_stpes'", "max_steps"], "--set", "max_stpes=3")


@case("flag-set-into-scalar")
def _(w):
    return w.train("flag-set-into-scalar", ["--set", "max_steps"], "--set", "max_steps.x=3")


@case("flag-unknown")
def _(w):
    return w.train("flag-unknown", ["--frobnicate"], "--frobnicate")


@case("flag-config-missing")
def _(w):
    return Case("train_ds", ["--config", str(w.root / "nope.yml")], ("nope.yml", "not found"))


@case("flag-config-is-dir")
def _(w):
    return Case("train_ds", ["--config", str(w.root)], (str(w.root), "not found"))


@case("flag-no-config")
def _(w):
    return Case("train_ds", [], ("--config",))


@case("zero-no-config")
def _(w):
    return Case("train_ds_zero", [], ("--config",))


@case("zero-stage-0")
def _(w):
    return w.train("zero-stage-0", ["config.yml", "zero_optimization.stage"], tool="train_ds_zero",
                   zero_optimization={"stage": 0})


@case("zero-bad-key")
def _(w):
    return w.train("zero-bad-key", ["config.yml", "'n_epocs'"], tool="train_ds_zero", n_epocs=2)


@case("flag-export-under-file")
def _(w):
    return w.train("flag-export-under-file", ["--export-hf", "good.jsonl"], "--export-hf", str(w.good / "out"))


@case("flag-export-not-an-export")
def _(w):
    return w.train("flag-export-not-an-export", ["--export-hf", str(w.root)], "--export-hf", str(w.root))


# ----------------------------------------------------------------------------- data files, generated
SAMPLES = {
    "pretrain": {"type": "pretrain", "text": "the river runs to the sea"},
    "instruct": {"type": "instruct", "instruct": "say hi", "input": "to me", "output": "hi"},
    "conversation": {"type": "conversation", "rounds": [["ask", "who are you"], ["ans", "a helper"]]},
    "conver_has_api": {"type": "conver_has_api", "api_desc": "weather(city)", "rounds": [
        ["ask", "rain in Rome?"], ["ans-api", {"actions": [{"inner_thought": "look", "api_name": "weather",
                                                            "api_param": "Rome", "api_res": "sun"}], "ans": "no"}]]},
    "ref_qa": {"type": "ref_qa", "reference": "the sky is blue", "rounds": [["ask", "sky colour?"], ["ans", "blue"]]},
}
OPTIONAL = {"input", "system"}
MARKS = {"pretrain": "the river runs to the sea", "instruct": "say hi", "conversation": "who are you",
         "conver_has_api": "weather(city)", "ref_qa": "the sky is blue"}
GOOD_LINE = json.dumps(SAMPLES["pretrain"]).encode()


def jsonl(sample) -> bytes:
    """A good sample on line 1, a blank line, then `sample` on line 3 (sample index 1)."""
    body = sample if isinstance(sample, bytes) else json.dumps(sample, ensure_ascii=False).encode()
    return GOOD_LINE + b"\n\n" + body + b"\n"


for kind, sample in SAMPLES.items():
    for key in sample:
        if key not in OPTIONAL:
            case(f"data-{kind}-missing-{key}")(lambda w, kind=kind, key=key: w.data(
                f"data-{kind}-missing-{key}", jsonl({k: v for k, v in SAMPLES[kind].items() if k != key}),
                ["line 3", "sample 1", f"field '{key}'"]))
        case(f"data-{kind}-wrong-type-{key}")(lambda w, kind=kind, key=key: w.data(
            f"data-{kind}-wrong-type-{key}", jsonl({**SAMPLES[kind], key: 7}),
            ["line 3", "sample 1", f"field '{key}'"]))
    mark = json.dumps(MARKS[kind]).encode()  # a string of the sample, replaced by bad bytes / nesting
    case(f"data-{kind}-not-utf8")(lambda w, kind=kind, mark=mark: w.data(
        f"data-{kind}-not-utf8", jsonl(json.dumps(SAMPLES[kind]).encode().replace(mark, b'"\xff\xfe"')),
        ["line 3", "0xff", "UTF-8"]))
    case(f"data-{kind}-gbk")(lambda w, kind=kind, mark=mark: w.data(
        f"data-{kind}-gbk", jsonl(json.dumps(SAMPLES[kind]).encode().replace(mark, '"你好"'.encode("gbk"))),
        ["line 3", "UTF-8"]))
    case(f"data-{kind}-deep-nesting")(lambda w, kind=kind, mark=mark: w.data(
        f"data-{kind}-deep-nesting", jsonl(json.dumps(SAMPLES[kind]).encode().replace(
            mark, b"[" * 5000 + b"]" * 5000)), ["line 3", "sample 1", "nested too deeply"]))
    case(f"data-{kind}-broken-line")(lambda w, kind=kind: w.data(
        f"data-{kind}-broken-line", jsonl(json.dumps(SAMPLES[kind]).encode()[:-5]), ["line 3", "sample 1", "JSON"]))
    case(f"data-{kind}-array-trailing")(lambda w, kind=kind: w.data(
        f"data-{kind}-array-trailing", b"[\n" + GOOD_LINE + b",\n" + json.dumps(SAMPLES[kind]).encode() + b"\n]\ngarbage\n",
        ["line 5", "after the JSON array"], suffix=".json"))
    case(f"data-{kind}-array-broken")(lambda w, kind=kind: w.data(
        f"data-{kind}-array-broken", b"[\n" + GOOD_LINE + b",\n" + json.dumps(SAMPLES[kind]).encode()[:-3] + b"\n]\n",
        ["invalid JSON array"], suffix=".json"))
    case(f"data-{kind}-not-object")(lambda w, kind=kind: w.data(
        f"data-{kind}-not-object", jsonl(list(SAMPLES[kind].values())), ["line 3", "sample 1", "object"]))

for name, content, expect in [("empty", b"", ["no samples"]), ("bom-only", b"\xef\xbb\xbf", ["no samples"]),
                              ("whitespace", b"\n \n\t\n", ["no samples"]), ("binary", bytes(range(256)) * 4, ["UTF-8"]),
                              ("unknown-type", jsonl({"type": "essay", "text": "x"}), ["line 3", "essay"]),
                              ("truncated-utf8", GOOD_LINE + b"\n" + '{"type": "pretrain", "text": "é'.encode()[:-1],
                               ["line 2", "UTF-8"])]:
    case(f"data-file-{name}")(lambda w, name=name, content=content, expect=expect: w.data(
        f"data-file-{name}", content, expect))


# ----------------------------------------------------------------------------- HF dirs: config.json, generated
LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
for key in LLAMA_REQUIRED:
    case(f"hf-config-missing-{key}")(lambda w, key=key: w.convert(
        f"hf-config-missing-{key}", "hg_to_pp", w.hf_variant(f"hf-config-missing-{key}", lambda d: edit_json(
            d / "config.json", lambda c: {k: v for k, v in c.items() if k != key})), ["config.json", f"'{key}'"]))
    for label, value in (("string", "64"), ("zero", 0), ("negative", -3), ("float", 2.5), ("null", None)):
        cid = f"hf-config-{key}-{label}"
        case(cid)(lambda w, key=key, value=value, cid=cid: w.convert(
            cid, "hg_to_pp", w.hf_variant(cid, lambda d: edit_json(d / "config.json", lambda c: {**c, key: value})),
            ["config.json", f"'{key}'"]))

HF_OPTIONAL_BAD = {"num_key_value_heads": ("2", "num_key_value_heads"), "head_dim": ("x", "head_dim"),
                   "rms_norm_eps": (-1, "rms_norm_eps"), "max_position_embeddings": (-1, "max_position_embeddings"),
                   "tie_word_embeddings": ("yes", "tie_word_embeddings"), "rope_parameters": (2, "rope_parameters"),
                   "attention_bias": ("no", "attention_bias"), "model_type": ("gpt2", "gpt2")}
for key, (value, expect) in HF_OPTIONAL_BAD.items():
    cid = f"hf-config-{key}-bad"
    case(cid)(lambda w, key=key, value=value, expect=expect, cid=cid: w.convert(
        cid, "hg_to_pp", w.hf_variant(cid, lambda d: edit_json(d / "config.json", lambda c: {**c, key: value})),
        ["config.json", expect]))

HF_RULES = {"kv-heads-not-dividing": ({"num_key_value_heads": 3}, "key/value heads"),
            "rope-no-factor": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}}, "factor"),
            "rope-unknown-type": ({"rope_parameters": {"rope_type": "wobbly", "rope_theta": 10000.0}}, "rope"),
            "no-model-type": ({"model_type": None}, "model_type")}
for name, (over, expect) in HF_RULES.items():
    cid = f"hf-config-{name}"
    case(cid)(lambda w, over=over, expect=expect, cid=cid: w.convert(
        cid, "hg_to_pp", w.hf_variant(cid, lambda d: edit_json(d / "config.json", lambda c: {**c, **over})),
        ["config.json", expect]))

for name, content, expect in [("list", b"[{}]", "JSON object"), ("not-json", b'{"model_type": "llama",', "line 1"),
                              ("not-utf8", b'{"model_type": "\xff"}', "UTF-8"), ("empty", b"", "JSON"),
                              ("deep", b"[" * 100000 + b"]" * 100000, "config.json")]:
    cid = f"hf-config-file-{name}"
    case(cid)(lambda w, content=content, expect=expect, cid=cid: w.convert(
        cid, "hg_to_pp", w.hf_variant(cid, lambda d: (d / "config.json").write_bytes(content)),
        ["config.json", expect]))


def _family_fields():
    """(family, key, kind of mutation) for every config.json field each family's Args.from_hf_config
    reads: required ones deleted, typed ones given a string."""
    from models import FAMILIES, get_family
    from models.hf_config import BOOL, NUMBER, POSITIVE_INT, CheckedConfig, args_from_hf_config

    out = []
    for name in FAMILIES:
        family, cfg, seen = get_family(name), get_family(name).tiny_hf_config(), set()

        class Recorder(CheckedConfig):
            def __getitem__(self, key):
                seen.add(key)
                return super().__getitem__(key)

            def get(self, key, default=None):
                seen.add(key)
                return super().get(key, default)

        family.Args.from_hf_config(Recorder(cfg, "config.json"))
        for key in sorted(seen & set(cfg)):
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # a family's warning about a guessed field
                    args_from_hf_config(family, {k: v for k, v in cfg.items() if k != key}, "config.json")
            except ValueError:
                out.append((name, key, "missing"))
            if key in POSITIVE_INT + NUMBER + BOOL:
                out.append((name, key, "string"))
    return out


def _config_only_dir(w, cid: str, family: str, key: str, how: str) -> Path:
    from models import get_family

    cfg = get_family(family).tiny_hf_config()
    cfg = {k: v for k, v in cfg.items() if k != key} if how == "missing" else {**cfg, key: "x"}
    d = w.root / cid / "hf"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


for family, key, how in _family_fields():
    cid = f"hf-{family}-{key}-{how}"
    case(cid)(lambda w, family=family, key=key, how=how, cid=cid: w.convert(
        cid, "hg_to_pp", _config_only_dir(w, cid, family, key, how), ["config.json", key]))


# ----------------------------------------------------------------------------- HF dirs: safetensors, index, tokenizer
def _header(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite(path: Path, edit) -> None:
    """Rewrite the header (edit(header) -> header) in front of the same data."""
    _, header, data = _header(path)
    text = json.dumps(edit(header)).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _truncate_at(where):
    def mutate(d: Path):
        f = d / "model.safetensors"
        n, _, _ = _header(f)
        size = f.stat().st_size
        at = {"zero": 0, "in-length": 4, "after-length": 8, "mid-header": 8 + n // 2, "end-of-header": 8 + n,
              "mid-data": 8 + n + (size - 8 - n) // 2, "last-byte": size - 1}[where]
        f.write_bytes(f.read_bytes()[:at])
    return mutate


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


SAFETENSORS_BAD = {
    **{f"truncated-{w}": _truncate_at(w) for w in ("zero", "in-length", "after-length", "mid-header", "end-of-header",
                                                   "mid-data", "last-byte")},
    "length-huge": lambda d: (d / "model.safetensors").write_bytes(
        (2**40).to_bytes(8, "little") + (d / "model.safetensors").read_bytes()[8:]),
    "header-not-json": lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:8] + b"{" * _header(d / "model.safetensors")[0]
        + _header(d / "model.safetensors")[2]),
    "header-list": lambda d: _rewrite(d / "model.safetensors", lambda h: [h]),
    "dtype-unknown": lambda d: _rewrite(d / "model.safetensors", lambda h: {
        **h, _first_tensor(h): {**h[_first_tensor(h)], "dtype": "F99"}}),
    "offsets-past-data": lambda d: _rewrite(d / "model.safetensors", lambda h: {
        **h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": [0, 10**9]}}),
    "shape-vs-offsets": lambda d: _rewrite(d / "model.safetensors", lambda h: {
        **h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [7, 7]}}),
    "trailing-bytes": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes() + b"x" * 64),
    "garbage": lambda d: (d / "model.safetensors").write_bytes(b"garbage " * 200),
}
for name, mutate in SAFETENSORS_BAD.items():
    cid = f"hf-safetensors-{name}"
    case(cid)(lambda w, mutate=mutate, cid=cid: w.convert(
        cid, "hg_to_pp", w.hf_variant(cid, mutate), ["model.safetensors"]))


@case("train-from-hf-truncated-safetensors")
def _(w):
    cid = "train-from-hf-truncated-safetensors"
    return w.train(cid, ["model.safetensors"], model_path=str(w.hf_variant(cid, _truncate_at("mid-data"))))


@case("train-from-hf-garbage-safetensors")
def _(w):
    cid = "train-from-hf-garbage-safetensors"
    return w.train(cid, ["model.safetensors"], model_path=str(w.hf_variant(cid, SAFETENSORS_BAD["garbage"])))


@case("demo-from-hf-truncated-safetensors")
def _(w):
    cid = "demo-from-hf-truncated-safetensors"
    return w.demo(cid, ["model.safetensors"], model=w.hf_variant(cid, _truncate_at("mid-header")))


def _index(d: Path, index) -> None:
    (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


for name, index, expect in [("not-json", "{", "line 1"), ("no-weight-map", {"metadata": {}}, "weight_map"),
                            ("weight-map-list", {"weight_map": ["a"]}, "weight_map"),
                            ("shard-missing", {"weight_map": {"model.embed_tokens.weight": "nope.safetensors"}},
                             "nope.safetensors")]:
    cid = f"hf-index-{name}"
    case(cid)(lambda w, index=index, expect=expect, cid=cid: w.convert(
        cid, "hg_to_pp", w.hf_variant(cid, lambda d: _index(d, index)), ["index.json" if expect != "nope.safetensors"
                                                                         else "nope.safetensors", expect]))

TOKENIZER_BAD = {
    "tokenizer-json-not-json": (lambda d: (d / "tokenizer.json").write_text("{not json"), ["tokenizer.json", "line 1"]),
    "tokenizer-json-truncated": (lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:300]),
                                 ["tokenizer.json", "JSON"]),
    "tokenizer-json-list": (lambda d: (d / "tokenizer.json").write_text("[1, 2]"), ["tokenizer.json", "JSON object"]),
    "tokenizer-json-wrong-shape": (lambda d: (d / "tokenizer.json").write_text('{"model": 3}'), ["tokenizer"]),
    "tokenizer-config-not-utf8": (lambda d: (d / "tokenizer_config.json").write_bytes(b'{"a": "\xff"}'),
                                  ["tokenizer_config.json", "UTF-8"]),
    "tokenizer-config-bad-eos": (lambda d: edit_json(d / "tokenizer_config.json", lambda c: {**c, "eos_token": 5}),
                                 ["tokenizer"]),
    "tokenizer-chat-template-syntax": (lambda d: edit_json(d / "tokenizer_config.json", lambda c: {
        **c, "chat_template": "{% if %}"}), ["chat_template"]),
}
for name, (mutate, expect) in TOKENIZER_BAD.items():
    case(f"train-from-hf-{name}")(lambda w, mutate=mutate, expect=expect, name=name: w.train(
        f"train-from-hf-{name}", [str(w.root / f"train-from-hf-{name}" / "hf"), *expect],
        model_path=str(w.hf_variant(f"train-from-hf-{name}", mutate))))


@case("demo-tokenizer-broken")
def _(w):
    return w.demo("demo-tokenizer-broken", ["tokenizer.json"],
                  model=w.hf_variant("demo-tokenizer-broken", TOKENIZER_BAD["tokenizer-json-not-json"][0]))


@case("hg2pp-no-tokenizer")
def _(w):
    return w.convert("hg2pp-no-tokenizer", "hg_to_pp", w.hf_variant("hg2pp-no-tokenizer", lambda d: [
        f.unlink() for f in d.iterdir() if "token" in f.name]), ["tokenizer"])


# ----------------------------------------------------------------------------- checkpoint dirs as input, outputs
LATEST_BAD = {"garbage": b"\xff\xfe\x00\x01", "empty": b"", "two-lines": b"global_step0\nglobal_step1\n",
              "parent": b"../elsewhere", "absolute": b"/etc", "missing-tag": b"global_step99"}


def latest_case(w, cid: str, content: bytes, via: str) -> Case:
    pp = w.pp_variant(cid, lambda d: (d / "latest").write_bytes(content))
    expect = ["global_step99"] if content == b"global_step99" else [str(pp / "latest")]
    if via == "train":
        return w.train(cid, expect, model_path=str(pp))
    if via == "pp2hg":
        return w.convert(cid, "pp_to_hg", pp, expect)
    return w.demo(cid, expect, model=pp)


for name, content in LATEST_BAD.items():
    for via in ("train", "pp2hg", "demo"):
        case(f"latest-{name}-{via}")(lambda w, content=content, via=via, cid=f"latest-{name}-{via}": latest_case(
            w, cid, content, via))


# a layer file that torch.load reads but that is not a dict of tensors by name (another tool's
# torch.save): one line naming the file from every reader (pp_to_hg once said "TypeError: cannot
# convert dictionary update sequence element #0 to a sequence")
LAYER_CONTENT_BAD = {"list": (lambda t: [t.zeros(2)], "holds a list"), "tensor": (lambda t: t.zeros(3), "holds a Tensor"),
                     "none": (lambda t: None, "holds None"),
                     "non-tensor-value": (lambda t: {"input_layernorm.weight": [1.0]}, "holds a list, not a tensor"),
                     "non-str-key": (lambda t: {0: t.zeros(2)}, "key 0 is an int")}


def layer_content_case(w, cid: str, make, expect: str, via: str) -> Case:
    import torch

    layer = "global_step0/layer_01-model_states.pt"
    pp = w.pp_variant(cid, lambda d: torch.save(make(torch), d / layer))
    expect = [str(pp / layer), expect]
    if via == "train":
        return w.train(cid, expect, model_path=str(pp))
    if via == "pp2hg":
        return w.convert(cid, "pp_to_hg", pp, expect)
    if via == "verify":
        return Case("convert_model", ["verify", str(pp)], tuple(expect))
    return w.demo(cid, expect, model=pp)


def bin_content_case(w, cid: str, make, expect: str, via: str) -> Case:
    """The same contents as an HF dir's pytorch_model.bin (its only weights file)."""
    import torch

    def mutate(d: Path) -> None:
        (d / "model.safetensors").unlink()
        torch.save(make(torch), d / "pytorch_model.bin")

    hf = w.hf_variant(cid, mutate)
    expect = [str(hf / "pytorch_model.bin"), expect]
    return w.convert(cid, "hg_to_pp", hf, expect) if via == "hg2pp" else w.demo(cid, expect, model=hf)


for name in ("list", "non-str-key"):
    for via in ("hg2pp", "demo"):
        case(f"bin-content-{name}-{via}")(lambda w, make=LAYER_CONTENT_BAD[name][0], expect=LAYER_CONTENT_BAD[name][1],
                                          via=via, cid=f"bin-content-{name}-{via}": bin_content_case(w, cid, make,
                                                                                                    expect, via))


for name, (make, expect) in LAYER_CONTENT_BAD.items():
    for via in ("pp2hg", "demo", "verify") + (("train",) if name in ("list", "non-str-key") else ()):
        case(f"layer-content-{name}-{via}")(lambda w, make=make, expect=expect, via=via,
                                            cid=f"layer-content-{name}-{via}": layer_content_case(w, cid, make, expect, via))


@case("save-path-latest-garbage")
def _(w):
    cid = "save-path-latest-garbage"
    save = w.pp_variant(cid, lambda d: (d / "latest").write_bytes(b"\x00\xff"))
    return Case("train_ds", ["--config", w.config(cid, save_path=str(save))], (str(save / "latest"),),
                unchanged=(save,))


for name, tag in {"parent": "../..", "slash": "a/b", "empty": "", "missing": "global_step42"}.items():
    case(f"pp2hg-tag-{name}")(lambda w, name=name, tag=tag: w.convert(
        f"pp2hg-tag-{name}", "pp_to_hg", w.pp, ["--tag" if name != "missing" else "global_step42"], "--tag", tag))


@case("hg2pp-save-under-file")
def _(w):
    out = w.good / "out"
    return Case("convert_model", ["hg_to_pp", "--input-path", str(w.hf), "--save-path", str(out)],
                ("good.jsonl", "is a file"))


@case("pp2hg-save-under-file")
def _(w):
    out = w.good / "out"
    return Case("convert_model", ["pp_to_hg", "--input-path", str(w.pp), "--save-path", str(out)],
                ("good.jsonl", "is a file"))


@case("hg2pp-save-exists")
def _(w):
    return Case("convert_model", ["hg_to_pp", "--input-path", str(w.hf), "--save-path", str(w.pp)],
                (str(w.pp), "already exists"), unchanged=(w.pp,))


@case("convert-input-missing")
def _(w):
    return w.convert("convert-input-missing", "pp_to_hg", w.root / "nowhere", ["nowhere"])


@case("convert-max-shard-zero")
def _(w):
    return w.convert("convert-max-shard-zero", "pp_to_hg", w.pp, ["--max-shard-size"], "--max-shard-size", "0")


@case("convert-direction-unknown")
def _(w):
    return Case("convert_model", ["hf_to_gguf", "--input-path", str(w.hf), "--save-path", str(w.out("x"))],
                ("hf_to_gguf",))


# ----------------------------------------------------------------------------- demo.py
DEMO_FLAGS = {"max-new-tokens-0": (["--max-new-tokens", "0"], "--max-new-tokens"),
              "max-new-tokens-text": (["--max-new-tokens", "lots"], "--max-new-tokens"),
              "temperature-0": (["--temperature", "0"], "--temperature"),
              "top-p-0": (["--top-p", "0"], "--top-p"), "top-p-1.5": (["--top-p", "1.5"], "--top-p"),
              "top-k-negative": (["--top-k", "-1"], "--top-k"),
              "repetition-penalty-0": (["--repetition-penalty", "0"], "--repetition-penalty"),
              "seed-negative": (["--seed", "-1"], "--seed"), "devices-bogus": (["--devices", "gpu0"], "--devices"),
              "devices-missing-gpu": (["--devices", "cuda:7"], "--devices"), "dtype": (["--dtype", "fp8"], "--dtype"),
              "template": (["--template", "fancy"], "--template"), "type": (["--type", "essay"], "--type"),
              "ref-qa-no-reference": (["--type", "ref_qa"], "--reference"),
              "reference-file-missing": (["--type", "ref_qa", "--reference", "@/nonexistent/ref.txt"], "ref.txt"),
              "backend": (["--backend", "tf"], "--backend")}
for name, (flags, expect) in DEMO_FLAGS.items():
    case(f"demo-flag-{name}")(lambda w, name=name, flags=flags, expect=expect: w.demo(
        f"demo-flag-{name}", [expect], *flags))


@case("demo-reference-not-utf8")
def _(w):
    ref = w.path("demo-reference-not-utf8", "ref.txt")
    ref.write_bytes(b"ok\n\xff\n")
    return w.demo("demo-reference-not-utf8", ["ref.txt", "line 2"], "--type", "ref_qa", "--reference", f"@{ref}")


for name, content, expect in [("not-utf8", b'{"type": "instruct", "instruct": "\xff"}\n', ["line 1", "UTF-8"]),
                              ("broken-line", b'{"type": "instruct", "instruct": "a"}\n\n{"type": \n', ["line 3", "JSON"]),
                              ("missing-field", b'{"type": "instruct"}\n', ["sample 0", "instruct"]),
                              ("empty", b"", ["no prompts"]),
                              ("answered", b'{"type": "conversation", "rounds": [["ask", "a"], ["ans", "b"]]}\n',
                               ["rounds"])]:
    def build(w, name=name, content=content, expect=expect):
        w.path(f"demo-prompts-{name}", "prompts.jsonl").write_bytes(content)
        return w.demo(f"demo-prompts-{name}", ["prompts.jsonl", *expect])
    case(f"demo-prompts-{name}")(build)


@case("demo-prompts-missing")
def _(w):
    c = w.demo("demo-prompts-missing", ["nope.jsonl"])
    c.argv[c.argv.index("--prompts") + 1] = str(w.root / "nope.jsonl")
    return c


@case("demo-output-is-dir")
def _(w):
    c = w.demo("demo-output-is-dir", ["--output"])
    c.argv[c.argv.index("--output") + 1] = str(w.root)
    c.absent = ()
    return c


@case("demo-output-dir-missing")
def _(w):
    c = w.demo("demo-output-dir-missing", ["--output"])
    c.argv[c.argv.index("--output") + 1] = str(w.root / "no" / "such" / "dir" / "a.jsonl")
    return c


@case("demo-model-missing")
def _(w):
    return w.demo("demo-model-missing", ["nowhere"], model=w.root / "nowhere")


@case("demo-backend-hf-on-pp")
def _(w):
    return w.demo("demo-backend-hf-on-pp", ["backend 'hf'"], "--backend", "hf")


# ----------------------------------------------------------------------------- an outsider's inputs, generated
# Written the way users and other tools produce them (YAML 1.1 quirks, JSON configs, Windows and
# old-Mac files, compressed or binary data, half-written lines, non-finite and huge numbers, odd
# --set forms); what should work is in test_outsider_inputs_that_work below.
def _yaml(w, cid: str, extra: str = "", drop=()) -> str:
    """The valid base config as YAML text, then `extra` lines (keys in `drop` left out of the base)."""
    raw = {k: v for k, v in {**w.base, "save_path": str(w.out(cid))}.items() if k not in drop}
    return yaml.safe_dump(raw) + extra


OUTSIDER_YAML = {  # name -> (text after the base config, key left out of the base, expected parts)
    "multi-document": ("---\nmax_steps: 3\n", None, ["another document"]),
    "python-object-tag": ("seed: !!python/object/apply:os.system ['true']\n", "seed", ["line", "python/object"]),
    "python-name-tag": ("seed: !!python/name:os.system\n", "seed", ["python/name"]),
    "custom-tag": ("seed: !env SEED\n", "seed", ["'!env'"]),
    "binary-tag": ("model_path: !!binary aGVsbG8=\n", "model_path", ["'model_path'", "str"]),
    "set-tag": ("data_path: !!set {a, b}\n", "data_path", ["'data_path'"]),
    "timestamp": ("seed: 2024-01-01\n", "seed", ["'seed'", "datetime"]),
    "tab-after-colon": ("seed:\t7\n", "seed", ["line", "tabs"]),
    "nul-byte": ("seed: 4\x002\n", "seed", ["line", "'\\x00'"]),
    # a billion laughs: 9**9 strings once expanded; the error names the key without printing them all
    "alias-bomb": ("data_path: [" + ", ".join(f"&a{i} [" + ", ".join([f"*a{i - 1}" if i else "lol"] * 9) + "]"
                                              for i in range(9)) + "]\n", "data_path", ["'data_path'", "..."]),
    "merge-then-duplicate": ("<<: {max_steps: 3}\nmax_seq_len: 32\n", None, ["'max_seq_len' given twice"]),
    "int-octal-is-not-a-path": ("save_path: 0755\n", "save_path", ["'save_path'", "493"]),
    "key-trailing-space": ("'max_steps ': 2\n", "max_steps", ["unknown key 'max_steps '", "did you mean 'max_steps'"]),
    "key-other-case": ("Train_Batch_Size: 4\n", None, ["'Train_Batch_Size'", "did you mean 'train_batch_size'"]),
    "key-other-case-nested": ("zero_optimization: {Stage: 1}\n", None, ["zero_optimization.Stage"]),
    **{f"list-of-one-{k}": (f"{k}: [{v}]\n", k, [f"'{k}'"]) for k, v in (
        ("max_seq_len", 64), ("model_path", "m"), ("gradient_clipping", 1.0), ("bf16", "{enabled: true}"),
        ("train_micro_batch_size_per_gpu", 2), ("prompt_template", "auto"))},
}
for name, (extra, drop, expect) in OUTSIDER_YAML.items():
    case(f"outsider-yaml-{name}")(lambda w, name=name, extra=extra, drop=drop, expect=expect: Case(
        "train_ds", ["--config", w.config(f"outsider-yaml-{name}", text=_yaml(w, f"outsider-yaml-{name}", extra,
                                                                             [drop] if drop else []))],
        ("config.yml", *expect), absent=(w.out(f"outsider-yaml-{name}"),)))

OUTSIDER_CONFIG_BYTES = {  # name -> (file name, bytes of the whole file, expected parts)
    "utf16-without-bom": ("config.yml", lambda t: t.encode("utf-16-le"), ["line 1", "not allowed in YAML"]),
    "json-duplicate-key": ("c.json", lambda t: json.dumps(yaml.safe_load(t))[:-1].encode() + b', "max_steps": 3}',
                           ["c.json", "'max_steps' given twice"]),
    "json-nan-clip": ("c.json", lambda t: json.dumps({**yaml.safe_load(t), "gradient_clipping": float("nan")}).encode(),
                      ["c.json", "gradient_clipping", "nan"]),
}
for name, (fname, make, expect) in OUTSIDER_CONFIG_BYTES.items():
    def build(w, name=name, fname=fname, make=make, expect=expect):
        cid = f"outsider-config-{name}"
        path = w.path(cid, fname)
        path.write_bytes(make(_yaml(w, cid)))
        return Case("train_ds", ["--config", str(path)], tuple(expect), absent=(w.out(cid),))
    case(f"outsider-config-{name}")(build)

INF, NAN = float("inf"), float("nan")
OUTSIDER_VALUES = {  # dotted key (as w.config takes it) -> bad value, expected parts; all before anything is built
    "optimizer__params__lr=inf": ("optimizer__params__lr", INF, "optimizer.params.lr"),
    "optimizer__params__weight_decay=inf": ("optimizer__params__weight_decay", INF, "weight_decay"),
    "optimizer__params__eps=inf": ("optimizer__params__eps", INF, "optimizer.params.eps"),
    "gradient_clipping=inf": ("gradient_clipping", INF, "gradient_clipping"),
    "save_every_minutes=nan": ("save_every_minutes", NAN, "save_every_minutes"),
    "save_every_minutes=inf": ("save_every_minutes", INF, "save_every_minutes"),
    "aux_max_z_loss=nan": ("aux_max_z_loss", {"weight": NAN}, "aux_max_z_loss.weight"),
    "aux_max_z_loss=inf": ("aux_max_z_loss", {"weight": INF}, "aux_max_z_loss.weight"),
    "warmup_max_lr=inf": ("scheduler", {"type": "WarmupLR", "params": {"warmup_max_lr": INF}}, "warmup_max_lr"),
    "warmup_max_lr=0": ("scheduler", {"type": "WarmupLR", "params": {"warmup_max_lr": 0}}, "warmup_max_lr"),
    "warmup_max_lr=text": ("scheduler", {"type": "WarmupLR", "params": {"warmup_max_lr": "fast"}}, "warmup_max_lr"),
    "warmup_max_lr=list": ("scheduler", {"type": "WarmupLR", "params": {"warmup_max_lr": [1e-3]}}, "warmup_max_lr"),
    "cycle_max_lr=text": ("scheduler", {"type": "OneCycle", "params": {"cycle_max_lr": "fast"}}, "cycle_max_lr"),
    "warmup_min_lr=inf": ("scheduler", {"type": "WarmupLR", "params": {"warmup_min_lr": INF}}, "warmup_min_lr"),
    "total_num_steps=text": ("scheduler", {"type": "WarmupDecayLR", "params": {"total_num_steps": "ten"}},
                             "total_num_steps"),
    "total_num_steps=float": ("scheduler", {"type": "WarmupDecayLR", "params": {"total_num_steps": 1.5}},
                              "total_num_steps"),
    "scheduler-type-list": ("scheduler", {"type": ["WarmupLR"]}, "scheduler.type"),
    "scheduler-params-typo": ("scheduler", {"type": "WarmupLR", "parms": {"warmup_num_steps": 2}}, "scheduler.parms"),
    "optimizer-params-typo": ("optimizer", {"type": "AdamW", "parms": {"lr": 1e-3}}, "optimizer.parms"),
    "optimizer-param-typo": ("optimizer", {"type": "AdamW", "params": {"lrr": 1e-3}}, "optimizer.params.lrr"),
    "lion-takes-no-eps": ("optimizer", {"type": "Lion", "params": {"lr": 1e-4, "eps": 1e-8}}, "optimizer.params.eps"),
    "data_weights-huge": ("data_weights", [1e30], "data_weights[0]"),
    "seed=2**64": ("seed", 2**64, "'seed'"),
    "dims-huge": ("model_topo__process_topology__dims", [10**30, 1], "dims"),
    **{f"{key}=10**30": (key, 10**30, f"'{key}'") for key in ("train_micro_batch_size_per_gpu",
                                                              "gradient_accumulation_steps", "train_batch_size")},
}
for key, tp in _fields():
    if tp is int:  # every integer key we own, past what torch and numpy hold
        OUTSIDER_VALUES[f"{key}=10**30"] = (key, 10**30, f"'{key.replace('__', '.')}'")
for name, (key, value, expect) in OUTSIDER_VALUES.items():
    case(f"outsider-value-{name}")(lambda w, name=name, key=key, value=value, expect=expect: w.train(
        f"outsider-value-{name}", ["config.yml", expect], "--dry-run", "--world-size", "1", **{key: value}))

OUTSIDER_SET = {"=1": "empty key", "optimizer..lr=1": "empty key", ".max_steps=1": "empty key",
                "max_steps.=1": "empty key", "optimizer. parms.lr=1": "optimizer.parms"}
for i, (item, expect) in enumerate(OUTSIDER_SET.items()):
    case(f"outsider-set-{i}")(lambda w, i=i, item=item, expect=expect: w.train(
        f"outsider-set-{i}", [expect], "--dry-run", "--world-size", "1", "--set", item))

OUTSIDER_FLAGS = {"world-size-without-dry-run": (["--world-size", "4"], "--world-size"),
                  "gpu-mem-without-dry-run": (["--gpu-mem-gib", "40"], "--gpu-mem-gib"),
                  "dry-run-with-value": (["--dry-run=1"], "--dry-run"),
                  "world-size-float": (["--dry-run", "--world-size", "1e3"], "--world-size"),
                  "gpu-mem-nan": (["--dry-run", "--gpu-mem-gib", "nan"], "--gpu-mem-gib"),
                  "local-rank-text": (["--local_rank", "x"], "--local_rank")}
OUTSIDER_DEMO_FLAGS = {"temperature-inf": ["--temperature", "inf"], "repetition-penalty-inf": ["--repetition-penalty", "1e400"],
                       "top-k-huge": ["--top-k", str(10**30)], "seed-2**64": ["--seed", str(2**64)],
                       "max-new-tokens-huge": ["--max-new-tokens", str(10**30)]}
for name, flags in OUTSIDER_DEMO_FLAGS.items():
    case(f"outsider-demo-flag-{name}")(lambda w, name=name, flags=flags: w.demo(
        f"outsider-demo-flag-{name}", [flags[0], "finite"], *flags))
for name, value in {"inf": "inf", "nan": "nan", "overflow": "1e400"}.items():
    case(f"outsider-convert-max-shard-{name}")(lambda w, name=name, value=value: w.convert(
        f"outsider-convert-max-shard-{name}", "pp_to_hg", w.pp, ["--max-shard-size"], "--max-shard-size", value))
for name, (flags, expect) in OUTSIDER_FLAGS.items():
    case(f"outsider-flag-{name}")(lambda w, name=name, flags=flags, expect=expect: w.train(
        f"outsider-flag-{name}", [expect], *flags))


def _symlink_loop(f: Path) -> None:
    os.symlink(f.with_name("other"), f)
    os.symlink(f, f.with_name("other"))


OUTSIDER_PATHS = {  # name -> (make the data path, expected parts)
    "dir": (lambda f: f.mkdir(), "is a directory"),
    "dangling-symlink": (lambda f: os.symlink(f.with_name("gone.jsonl"), f), "broken symbolic link"),
    "symlink-loop": (_symlink_loop, "broken symbolic link"),
    "fifo": (lambda f: os.mkfifo(f), "not a regular file"),
    "glob": (None, "wildcards are not expanded"),
}
for name, (make, expect) in OUTSIDER_PATHS.items():
    def build(w, name=name, make=make, expect=expect):
        cid = f"outsider-path-{name}"
        f = w.path(cid, "data.jsonl" if make else "*.jsonl")
        if make:
            make(f)
        return w.train(cid, ["data_path[1]", expect], data_path=[str(w.good), str(f)])
    case(f"outsider-path-{name}")(build)

_LINES = b"\n".join(json.dumps(SAMPLES[k]).encode() for k in SAMPLES) + b"\n"
OUTSIDER_DATA = {  # name -> (file bytes, expected parts); the file is data_path[1]
    "utf16-without-bom": (_LINES.decode().encode("utf-16-le"), ["line 1", "NUL", "UTF-8"]),
    "nul-in-line": (GOOD_LINE + b"\n" + GOOD_LINE[:9] + b"\x00" + GOOD_LINE[9:] + b"\n", ["line 2", "sample 1", "NUL"]),
    "nul-padded-tail": (_LINES + b"\x00" * 64, ["line 6", "NUL"]),  # a crash preallocated the file
    "half-written-last-line": (_LINES + GOOD_LINE[:20], ["line 6", "sample 5", "JSON"]),
    "gzip": (gzip.compress(_LINES), ["line 1", "gzip"]),
    "zstd": (b"\x28\xb5\x2f\xfd" + bytes(32), ["zstd"]), "xz": (b"\xfd7zXZ\x00" + bytes(32), ["xz"]),
    "bzip2": (b"BZh91AY&SY" + bytes(32), ["bzip2"]), "zip": (b"PK\x03\x04" + bytes(32), ["zip"]),
    "parquet": (b"PAR1" + bytes(32) + b"PAR1", ["Parquet"]),
    "lone-surrogate-text": (b'{"type": "pretrain", "text": "a\\ud83d b"}\n', ["line 1", "field 'text'", "surrogate"]),
    "lone-surrogate-round": (json.dumps({"type": "conversation", "rounds": [["ask", "q"], ["ans", "X"]]}).replace(
        "X", "\\udc00").encode() + b"\n", ["field 'rounds[1][1]'", "surrogate"]),
    "lone-surrogate-api-res": (json.dumps(SAMPLES["conver_has_api"]).replace('"sun"', '{"t": "\\udfff"}').encode()
                               + b"\n", ["rounds[1][1].actions[0].api_res.t", "surrogate"]),
    "lone-surrogate-array": (b'[{"type": "pretrain", "text": "\\ud800"}]', ["sample 0", "surrogate"]),
    "line-null": (GOOD_LINE + b"\nnull\n", ["line 2", "sample 1", "object"]),
    "line-true": (GOOD_LINE + b"\ntrue\n", ["line 2", "object"]),
    "line-string": (GOOD_LINE + b'\n"just text"\n', ["line 2", "object"]),
    "role-capitalised": (jsonl({"type": "conversation", "rounds": [["Ask", "a"], ["Ans", "b"]]}), ["rounds[0][0]", "'Ask'"]),
    "openai-messages": (jsonl({"type": "conversation", "rounds": [{"role": "user", "content": "a"}]}), ["rounds[0]"]),
    "type-capitalised": (jsonl({"type": "Pretrain", "text": "a"}), ["field 'type'", "'Pretrain'"]),
    "pretty-printed-object": (json.dumps(SAMPLES["instruct"], indent=2).encode(), ["line 1", "one sample per line"]),
    "jsonl-trailing-comma": (GOOD_LINE + b",\n", ["line 1", "JSON"]),
    "single-quotes": (b"{'type': 'pretrain', 'text': 'a'}\n", ["line 1", "JSON"]),
    "csv": (b"type,text\npretrain,hello\n", ["line 1", "JSON"]),
    "json-nan-text": (b'{"type": "pretrain", "text": NaN}\n', ["field 'text'", "float"]),
    "array-trailing-comma": (b"[" + GOOD_LINE + b"," + GOOD_LINE + b",]", ["invalid JSON array"]),
    "array-of-arrays": (b"[[" + GOOD_LINE + b"]]", ["sample 0", "object"]),
    "array-empty": (b"[]", ["no samples"]),
}
for name, (content, expect) in OUTSIDER_DATA.items():
    case(f"outsider-data-{name}")(lambda w, name=name, content=content, expect=expect: w.data(
        f"outsider-data-{name}", content, expect, suffix=".json" if name.startswith("array") else ".jsonl"))


def test_outsider_inputs_that_work(ws, tmp_path):
    """What a new user writes and should just work: YAML anchors and merge keys, YAML 1.1 booleans
    (`fp8: off`), a DeepSpeed section left empty, a JSON config indented with tabs, UTF-16 and CR-only
    config files, `~` in paths, lowercase optimizer names, --set with spaces or into an empty section."""
    from engine.config import load_config

    def load(text: str | bytes, *sets: str, name: str = "c.yml"):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return load_config(path, list(sets))

    base = yaml.safe_dump({**ws.base, "save_path": str(tmp_path / "out")})
    bare = yaml.safe_dump({k: v for k, v in {**ws.base, "save_path": str(tmp_path / "out")}.items()
                           if k not in ("model_topo", "optimizer")})
    anchored = load(base.replace("data_path:\n", "data_path: &d\n", 1) + "eval_data_path: *d\n"
                    "bf16: &off {enabled: false}\nfp16: {<<: *off}\n")
    assert anchored.eval_data_path == anchored.data_path and anchored.ds["fp16"] == {"enabled": False}
    quirks = load(bare + "fp8: off\nresume: no\nzero_optimization:\nbf16:\nscheduler:\nmodel_topo:\n"
                  "optimizer: {type: adamw, params: {lr: 1.0e-3}}\n", "bf16.enabled=false", " max_steps = 3 ")
    assert (quirks.fp8, quirks.resume, quirks.max_steps) == ("off", False, 3)
    assert quirks.ds["optimizer"]["type"] == "AdamW" and quirks.ds["bf16"] == {"enabled": False}
    assert "zero_optimization" not in quirks.ds and quirks.model_topo.parts == "auto"
    assert load(bare, "optimizer={params: {lr: 1.0e-3}}").ds["optimizer"]["type"] == "AdamW"
    home = load(base, "save_path=~/runs/a", "data_path=[~/d.jsonl]")
    assert home.save_path == str(Path.home() / "runs" / "a") and home.data_path == [str(Path.home() / "d.jsonl")]
    as_json = json.dumps({**ws.base, "save_path": str(tmp_path / "out")}, indent="\t")
    for text, name in ((as_json, "c.json"), (as_json, "c.yml"), (base.encode("utf-16"), "c.yml"),
                       (base.replace("\n", "\r"), "c.yml"), (base.replace("\n", "\r\n"), "c.yml")):
        assert load(text, name=name).data_path == ws.base["data_path"], name
    # and the whole command: a UTF-16, tab-indented JSON config dry-runs
    cfg = tmp_path / "win.json"
    cfg.write_bytes(as_json.encode("utf-16"))
    code, err = run_main("train_ds", ["--config", str(cfg), "--dry-run", "--world-size", "1"])
    assert code in (0, None) and "error" not in err, err


def test_outsider_data_files_that_work(ws, tmp_path, monkeypatch):
    """Data files from Windows (UTF-16 with a BOM, CRLF), old Mac editors (CR only), mixed line ends,
    a last line without newline and Unicode blank lines read as the same samples as plain UTF-8 LF,
    also when a CRLF falls across the reader's chunks; then a real run trains on such files."""
    import data.reader
    from data.reader import read_records

    samples = [SAMPLES[k] for k in SAMPLES]
    lf = "\n".join(json.dumps(s, ensure_ascii=False) for s in samples) + "\n"
    variants = {"utf16-le.jsonl": lf.encode("utf-16"), "utf16-be.jsonl": b"\xfe\xff" + lf.encode("utf-16-be"),
                "utf32.jsonl": lf.encode("utf-32"), "crlf.jsonl": lf.replace("\n", "\r\n").encode(),
                "cr.jsonl": lf.replace("\n", "\r").encode(), "no-final-newline.jsonl": lf.rstrip("\n").encode(),
                "blank-lines.jsonl": ("\r\n \u00a0\n\u3000\r" + lf.replace("\n", "\n\t\n")).encode(),
                "array-crlf-utf16.json": json.dumps(samples, indent=1).replace("\n", "\r\n").encode("utf-16")}
    monkeypatch.setattr(data.reader, "_CHUNK", 7)  # odd chunks: CRLF pairs and UTF-16 code units split
    for name, content in variants.items():
        (tmp_path / name).write_bytes(content)
        assert [r for _, r in read_records(str(tmp_path / name))] == samples, name
    monkeypatch.undo()
    cid = "outsider-data-works"
    paths = [str(tmp_path / n) for n in ("utf16-le.jsonl", "cr.jsonl", "array-crlf-utf16.json")]
    code, err = run_main("train_ds", ["--config", ws.config(cid, data_path=paths, save_every_steps=0)])
    assert code in (0, None), err[-3000:]
    steps = [json.loads(line)["step"] for line in (ws.out(cid) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


# ----------------------------------------------------------------------------- running them
def digest(root: Path) -> dict[str, str]:
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(tool: str, argv: list[str]) -> tuple[object, str]:
    """`tool.main(argv)` as the command line runs it: exit code and stderr (a traceback when it escaped)."""
    err, out = io.StringIO(), io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            importlib.import_module(tool).main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:  # the CLI let an exception out: exactly the traceback the user would see
            traceback.print_exc(file=err)
            code = "traceback"
    return code, err.getvalue()


@pytest.fixture(scope="module")
def ws(tiny_pp, tmp_path_factory):
    from tests.dist import free_port

    w = Workspace(tmp_path_factory.mktemp("fuzz"), Path(tiny_pp))
    with pytest.MonkeyPatch.context() as mp:
        # training cases reach a 1-process gloo group in this process; keep its env local to this module
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}.items():
            mp.setenv(key, value)
        w.inputs = {p: digest(p) for p in (w.hf, w.pp, w.good)}
        yield w
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


@pytest.mark.parametrize("cid", list(SPECS))
def test_bad_input_is_one_error_line(ws, cid):
    c = SPECS[cid](ws)
    before = {p: digest(p) for p in c.unchanged}
    code, err = run_main(c.tool, c.argv)
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}, stderr:\n{err[-3000:]}"
    missing = [part for part in c.expect if part not in lines[0]]
    assert not missing, f"{missing} not in {lines[0]!r}"
    for p in c.absent:
        assert not p.exists(), f"{p} was created"
        assert not list(p.parent.glob(f".{p.name}.*")), f"temporary output left next to {p}"
    assert {p: digest(p) for p in c.unchanged} == before
    assert not list(ws.cache.glob("*.tmp-*")), "a partial data cache was left"


def test_at_least_100_generated_cases():
    assert len(SPECS) >= 100


def test_bom_is_accepted_everywhere(ws, tmp_path):
    """A UTF-8 BOM (Windows editors) is fine in the config, data files (JSONL and array) and config.json."""
    from data.reader import read_records
    from engine.checkpoints.files import read_hf_config

    bom = b"\xef\xbb\xbf"
    sample = json.dumps(SAMPLES["instruct"]).encode()
    (tmp_path / "a.jsonl").write_bytes(bom + sample + b"\n" + sample + b"\n")
    (tmp_path / "a.json").write_bytes(bom + b"[" + sample + b"]")
    assert [r for _, r in read_records(str(tmp_path / "a.jsonl"))] == [SAMPLES["instruct"]] * 2
    assert [r for _, r in read_records(str(tmp_path / "a.json"))] == [SAMPLES["instruct"]]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes(bom + (ws.hf / "config.json").read_bytes())
    assert read_hf_config(hf)["model_type"] == "llama"
    cfg = tmp_path / "bom.yml"
    cfg.write_bytes(bom + yaml.safe_dump({**ws.base, "save_path": str(tmp_path / "out")}).encode())
    code, err = run_main("train_ds", ["--config", str(cfg), "--dry-run", "--world-size", "1"])
    assert code in (0, None) and "error" not in err, err


def test_internal_errors_keep_their_traceback(ws, monkeypatch):
    """The boundaries catch what bad input raises, nothing else: a bug inside them is not reported
    as a user error (the tokenizer loader is the widest catch; a ZeroDivisionError passes it)."""
    import transformers

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    cid = "internal-error"
    code, err = run_main("train_ds", ["--config", ws.config(cid, model_path=str(ws.hf))])
    assert code == "traceback" and "ZeroDivisionError: a bug" in err and "error: " not in err


def test_shared_inputs_untouched(ws):
    """Runs last: no case wrote into the shared model dirs or data file."""
    assert {p: digest(p) for p in ws.inputs} == ws.inputs
