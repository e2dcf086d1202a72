"""Coming from gdGPT: its own configs (tests/data/gdgpt/, every variant of its history) dry-run and
train with only paths changed; its keys act (aux_max_z_loss, no_wd_kws, computed total_num_steps,
ZeRO without model_topo); the lr means what it says (issue 19)."""
import json
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, from_dict, load_config
from tests.conftest import run_main
from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parent.parent
GDGPT = ROOT / "tests" / "data" / "gdgpt"
PIPE_CONFIGS = sorted(GDGPT.glob("ds_config_pp@*"))
ZERO_CONFIGS = sorted(GDGPT.glob("ds_config_zero@*"))
DATA = [str(p) for p in sorted((ROOT / "examples" / "data").glob("*.json*"))]
BLOOM_7B = dict(model_type="bloom", vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32,
                layer_norm_epsilon=1e-5)  # the model gdGPT's pipeline configs are written for (parts [1, 5 x 6, 1])
LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """config.json-only dirs of the 7B models gdGPT's configs describe (--dry-run reads nothing else)."""
    root = tmp_path_factory.mktemp("shapes")
    for name, hf in (("bloom", BLOOM_7B), ("llama", LLAMA_7B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(hf))
    return root


def paths(model, save) -> list[str]:
    return ["--set", f"model_path={model}", "--set", f"data_path={DATA[0]}", "--set", f"save_path={save}"]


def cli(script, argv, capsys) -> tuple[int, str, str]:
    import importlib

    return run_main(importlib.import_module(script).main, argv, capsys)


@pytest.mark.parametrize("path", PIPE_CONFIGS + ZERO_CONFIGS, ids=lambda p: p.name)
def test_every_gdgpt_config_dry_runs_with_only_paths_changed(path, shapes, tmp_path, capsys):
    zero = path.name.startswith("ds_config_zero")
    model = shapes / ("llama" if zero else "bloom")
    code, out, err = cli("train_ds_zero" if zero else "train_ds",
                         ["--config", str(path), "--dry-run", "--world-size", "8"] + paths(model, tmp_path), capsys)
    assert code == 0, err
    assert "dry run:" in out and ("ZeRO-3 over 8 data-parallel ranks" in out if zero else "pp 8 x dp 1" in out)
    assert "fits" in out or "WARNING" in out
    raw, notes = path.read_text(), "\n".join(l for l in err.splitlines() if l.startswith("note: "))
    for key in ("fused_optimizer", "compression_training", '"axis"'):  # mapped or dropped, each with a note
        assert (key.strip('"') in notes) == (key in raw), err
    assert "error" not in err


def test_dry_run_checks_deepspeeds_own_keys(shapes, tmp_path, capsys):
    base = ["--config", str(PIPE_CONFIGS[-1]), "--dry-run", "--world-size", "8"] + paths(shapes / "bloom", tmp_path)
    for extra, message in [
        (["--set", "fp16.loss_scale_windw=10"], "DeepSpeed rejects fp16.loss_scale_windw: Extra inputs are not permitted"),
        (["--set", "zero_optimization.stage=1", "--set", "zero_optimization.offload_optimizer.devce=cpu"],
         "DeepSpeed rejects zero_optimization.offload_optimizer.devce"),
        (["--set", "scheduler.params.warmup_max_lr=1e-3"], "scheduler WarmupCosineLR: "),  # not its parameter
        (["--set", "scheduler.type=WarmupCosineLRR"], "is neither a DeepSpeed nor a torch scheduler"),
    ]:
        code, _, err = cli("train_ds", base + extra, capsys)
        assert code == 2 and message in err, (extra, err)
        assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1


# ---------------------------------------------------------------------- lr and schedule (issue 19)
def raw_config(**over) -> dict:
    raw = {"model_path": "m", "data_path": "d.jsonl", "save_path": "s",
           "optimizer": {"type": "AdamW", "params": {"lr": 2e-5}},
           "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}}
    raw.update(over)
    return raw


def test_optimizer_lr_is_the_peak_the_scheduler_reaches():
    cfg = from_dict(raw_config())
    assert cfg.ds["scheduler"]["params"] == {"warmup_num_steps": 10, "warmup_max_lr": 2e-5, "warmup_min_lr": 0.0}
    # the README's own override on a shipped config: nothing else to change
    tiny = load_config(ROOT / "configs" / "tiny_llama_cpu.yml", ["optimizer.params.lr=1e-5"])
    assert tiny.ds["scheduler"]["params"]["warmup_max_lr"] == 1e-5 == tiny.ds["optimizer"]["params"]["lr"]
    assert "total_num_steps" not in tiny.ds["scheduler"]["params"]  # the run's step count, at launch
    # a scheduler that sets its own peak gives it to the optimizer
    own = from_dict(raw_config(optimizer={"type": "AdamW", "params": {}},
                               scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 3e-4}}))
    assert own.ds["optimizer"]["params"]["lr"] == 3e-4
    assert from_dict(raw_config(scheduler=None)).ds["optimizer"]["params"]["lr"] == 2e-5
    assert from_dict(raw_config(optimizer=None, scheduler=None)).ds["optimizer"]["params"]["lr"] == 1e-5
    same = from_dict(raw_config(scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 2e-5}}))
    assert same.ds["scheduler"]["params"]["warmup_max_lr"] == 2e-5  # both set, equal: no conflict
    early = from_dict(raw_config(scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": -1,
                                                                               "total_num_steps": -1}}))
    assert early.ds["scheduler"]["params"]["warmup_max_lr"] == 2e-5  # gdGPT's early "-1 = computed"
    assert "total_num_steps" not in early.ds["scheduler"]["params"]
    for path in PIPE_CONFIGS + ZERO_CONFIGS:  # gdGPT's WarmupCosineLR takes the optimizer's lr as its peak
        cfg = load_config(path, ["model_path=m", "data_path=d", "save_path=s"])  # the early JSONs name no paths
        assert cfg.ds["optimizer"]["params"]["lr"] in (1e-5, 5e-5)


@pytest.mark.parametrize("over, message", [
    (dict(scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 2e-3}}),
     "optimizer.params.lr 2e-05 and scheduler.params.warmup_max_lr 0.002 disagree"),
    (dict(scheduler={"type": "OneCycle", "params": {"cycle_max_lr": 1e-3, "cycle_min_lr": 1e-5}}),
     "optimizer.params.lr 2e-05 and scheduler.params.cycle_max_lr 0.001 disagree"),
    (dict(max_steps=100, scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 5000}}),
     "max_steps 100 and scheduler.params.total_num_steps 5000 disagree"),
    (dict(aux_max_z_loss={"weight": -1}), "aux_max_z_loss.weight must be a finite number >= 0"),
    (dict(aux_max_z_loss={"wieght": 1e-4}), "unknown key 'aux_max_z_loss.wieght'"),
    (dict(optimizer={"type": "AdamW", "params": {"lr": 1e-5}, "no_wd_kws": ["(norm"]}),
     "optimizer.no_wd_kws: '(norm' is not a regular expression"),
])
def test_conflicts_are_one_line_naming_both_keys(over, message):
    from engine.config import validate

    with pytest.raises(ConfigError) as e:
        validate(from_dict(raw_config(**over), "x.yml"), 1, 6)
    assert str(e.value).startswith("x.yml: ") and message in str(e.value) and "\n" not in str(e.value)


def test_schedule_total_is_the_runs_step_count():
    from engine.training.deepspeed_setup import fill_schedule

    cfg = from_dict(raw_config())
    fill_schedule(cfg, 37)
    assert cfg.ds["scheduler"]["params"]["total_num_steps"] == 37
    kept = from_dict(raw_config(scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 90}}))
    fill_schedule(kept, 37)
    assert kept.ds["scheduler"]["params"]["total_num_steps"] == 90  # given explicitly: kept


# ---------------------------------------------------------------------- no_wd_kws, max-z loss
def test_no_wd_kws_exempts_matching_names_from_weight_decay():
    from engine.training.optim import build_optimizer
    from models import get_family
    from models.pipeline import SequentialModel

    fam = get_family("bloom")  # biases and layer norms everywhere
    module = SequentialModel(fam, fam.Args.from_hf_config(fam.tiny_hf_config()))
    spec = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}, "no_wd_kws": ["bias", "[a-zA-Z]*norm"]}
    opt = build_optimizer(spec, module.named_parameters())
    names = {id(p): n for n, p in module.named_parameters()}
    decayed, exempt = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert exempt and all("bias" in n or "norm" in n for n in exempt)
    assert decayed and not any("bias" in n or "norm" in n for n in decayed)
    assert decayed | exempt == set(names.values())
    default = build_optimizer({**spec, "no_wd_kws": None}, module.named_parameters())  # ours: 1-D params exempt
    assert all(p.ndim < 2 for p in default.param_groups[1]["params"])


def test_max_z_loss_matches_gdgpts_formula():
    from models.loss import MaxZLoss, causal_lm_loss
    from models.mixtral import MoELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    target = (labels, torch.tensor(0.25))
    w = 2e-4

    def reference(x):  # gdGPT's term, written out: weight * mean over positions of (max log_softmax)^2
        return w * x.log_softmax(dim=-1).max(dim=-1)[0].pow(2.0).mean()

    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = MaxZLoss(causal_lm_loss, w)
    got = loss(a, target)
    want = causal_lm_loss(b, target) + reference(b)
    got.backward(), want.backward()
    assert torch.allclose(got, want, rtol=1e-6) and torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)
    metrics = loss.pop_metrics()
    assert metrics["z_loss"] == pytest.approx(float(reference(logits)) / w, rel=1e-6)
    assert metrics["lm_loss"] == pytest.approx(float(causal_lm_loss(logits, target)), rel=1e-6)
    moe = MaxZLoss(MoELoss(0.5), w)  # an MoE keeps its router loss and metrics; z_loss is added
    out = moe((logits, torch.tensor(0.3), torch.zeros(1)), target)  # (logits, aux, router z): mixtral's head
    assert float(out) == pytest.approx(float(causal_lm_loss(logits, target) + 0.15 + reference(logits)), rel=1e-6)
    assert set(moe.pop_metrics()) == {"lm_loss", "aux_loss", "z_loss"}


# ---------------------------------------------------------------------- real runs (2 CPU processes)
def _train_from_file(path, overrides, zero):
    from engine.training.loop import train, train_zero

    return (train_zero if zero else train)(load_config(path, overrides)).losses


def run_gdgpt(path, model, save, zero=False, extra=()):
    """gdGPT's file with paths set; on CPU also fp16 off (DeepSpeed has no CPU fp16) and a global
    batch the tiny example data can fill."""
    over = [f"model_path={model}", f"data_path={DATA}", f"save_path={save}", "fp16.enabled=false",
            "train_batch_size=4", "max_seq_len=64", "max_steps=3", *extra]
    losses = run_ranks(_train_from_file, 2, path, over, zero)
    assert losses[0] == losses[1]
    return losses[0], [json.loads(l) for l in (Path(save) / "metrics.jsonl").read_text().splitlines()]


def test_gdgpt_pipeline_config_trains_with_its_keys_acting(gdgpt_llama, tmp_path):
    path = GDGPT / "ds_config_pp@f5aa4a4.yml"  # aux_max_z_loss, no_wd_kws, fused_optimizer, WarmupCosineLR
    losses, metrics = run_gdgpt(path, gdgpt_llama[0], tmp_path / "run",  # model: gdGPT's own hg_to_pp dir
                                extra=["model_topo.process_topology.dims=[2,1]", "model_topo.parts=auto",
                                       "optimizer.params.lr=3e-3", "prompt_template=gdgpt"])
    assert sorted(losses) == [1, 2, 3]
    for m in metrics:
        assert m["z_loss"] > 0 and abs(m["loss"] - (m["lm_loss"] + 2e-4 * m["z_loss"])) < 1e-5
    assert metrics[0]["lr"] == pytest.approx(0.02 * 3e-3)  # warmup_min_ratio x the optimizer's lr
    saved = yaml_of(tmp_path / "run" / "global_step3" / "config.yml")
    assert saved["scheduler"]["params"]["total_num_steps"] == 3  # filled from the run, as gdGPT did


def test_gdgpt_first_json_config_trains_without_model_topo(gdgpt_llama, tmp_path):
    # no model_topo (gdGPT's script hard-coded it), no paths, compression_training: every rank a stage
    losses, _ = run_gdgpt(GDGPT / "ds_config_pp@f3c21e7.json", gdgpt_llama[0], tmp_path / "run",
                          extra=["max_steps=2"])
    assert sorted(losses) == [1, 2]
    meta = json.loads((tmp_path / "run" / "global_step2" / "meta.json").read_text())
    assert (meta["layout"]["pp"], meta["layout"]["dp"]) == (2, 1)


def test_gdgpt_zero_config_without_model_topo_takes_every_rank(gdgpt_llama, tmp_path):
    # model: a gdGPT training output (save_path whose `latest` names checkpoint_final)
    losses, metrics = run_gdgpt(GDGPT / "ds_config_zero@3176d99.yml", gdgpt_llama[1], tmp_path / "run", zero=True)
    assert sorted(losses) == [1, 2, 3] and all(m["tokens"] > 0 for m in metrics)
    meta = json.loads((tmp_path / "run" / "global_step3" / "meta.json").read_text())
    assert meta["layout"]["dp"] == 2 and meta["layout"]["engine"] == "zero"


def yaml_of(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


# ---------------------------------------------------------------------- gdGPT's checkpoint dirs
@pytest.fixture(scope="module")
def gdgpt_llama(tiny_pp, tmp_path_factory):
    """The tiny llama as gdGPT's hg_to_pp writes it, and as a gdGPT training output."""
    from tests.gdgpt_layout import write_gdgpt_dir, write_gdgpt_run

    hf, root = Path(tiny_pp).parent / "hf", tmp_path_factory.mktemp("gdgpt")
    return write_gdgpt_dir(hf, root / "pp", "llama"), write_gdgpt_run(hf, root / "run", "llama")


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_pp_to_hg_reads_gdgpts_dirs(family, gdgpt_llama, tiny_pp, tmp_path, capsys):
    from engine.checkpoints.files import locate
    from models.tiny import make_tiny_hf_model, sample_texts
    from tests.gdgpt_layout import hf_state, write_gdgpt_dir, write_gdgpt_run

    if family == "llama":
        hf, (converted, run) = Path(tiny_pp).parent / "hf", gdgpt_llama
    else:  # tied embedding, biases, its own layer names
        hf = make_tiny_hf_model(tmp_path / "hf", "bloom", sample_texts(DATA))
        converted, run = write_gdgpt_dir(hf, tmp_path / "pp", family), write_gdgpt_run(hf, tmp_path / "run", family)
    want = hf_state(hf)
    for i, src in enumerate((converted, run, run / "checkpoint_final")):
        assert locate(src).gdgpt and locate(src).hf_dir.name in (converted.name, "checkpoint_final")
        out = tmp_path / f"out{i}"
        code, _, err = cli("convert_model", ["pp_to_hg", "--input-path", str(src), "--save-path", str(out)], capsys)
        assert code == 0, err
        got = hf_state(out)
        assert set(got) == set(want)
        assert all(torch.equal(got[k].float(), want[k].half().float()) for k in want)  # gdGPT stores fp16
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out1") is not None


def test_demo_reads_a_gdgpt_dir(gdgpt_llama, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"type": "instruct", "instruct": "Name a colour."},
        {"type": "conversation", "rounds": [["ask", "Hello"]]}]))
    code, _, err = cli("convert_model", ["pp_to_hg", "--input-path", str(gdgpt_llama[0]), "--save-path",
                                         str(tmp_path / "hf")], capsys)
    assert code == 0, err
    answers = []
    for model in (gdgpt_llama[0], gdgpt_llama[1], tmp_path / "hf"):
        out = tmp_path / f"{len(answers)}.jsonl"
        code, _, err = cli("demo", ["--model", str(model), "--prompts", str(prompts), "--output", str(out),
                                    "--max-new-tokens", "6", "--template", "default"], capsys)
        assert code == 0, err
        answers.append([json.loads(l)["answer"] for l in out.read_text().splitlines()])
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 2  # same weights, whichever layout


# ---------------------------------------------------------------------- prompt_template: gdgpt
README_SAMPLES = json.loads((GDGPT / "readme_samples.json").read_text())


@pytest.fixture(scope="module")
def gd_tok(tmp_path_factory):
    """The tests' tiny sentencepiece tokenizer, also trained on gdGPT's layout text (its '#', '`',
    '(' ... are otherwise unknown to it) and on gdGPT's README samples."""
    from models.tiny import make_tiny_tokenizer, sample_texts
    from tests.tokenizer_util import example_texts

    layout = ("A chat between a curious human and an artificial intelligence assistant. ### Human: ### Assistent: "
              "### Instruction: ### Response: ### Reference: #### api call ```python search(query='x', n=3) ``` "
              "#### api output {\"a\": [1]} Answer the following questions as best as you can.")
    return make_tiny_tokenizer(tmp_path_factory.mktemp("gd_tok"), example_texts() + [layout] +
                               sample_texts([GDGPT / "readme_samples.json"]), 320)


def gdgpt_reference(ob: dict, tok) -> tuple[list[int], list[int]]:
    """gdGPT's datasets.py written out plainly: each piece tokenized alone, prompt pieces labelled
    -100, no BOS; (ids, labels) before its truncate_and_pad (which then appended one more EOS)."""
    eos, ids, labels = tok.eos_token, [], []

    def piece(text, ignore):
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(part)
        labels.extend([-100] * len(part) if ignore else part)

    def rounds(items, ask, ans):
        for role, value in items:
            if role == "ask":
                piece(f"### {ask}: {value} \n", True)
            elif role == "ans":
                piece(f"### {ans}: ", True)
                piece(f"{value} {eos}\n", False)
            else:
                for a in value["actions"]:
                    piece(f"### {ans}: ", True)
                    kw = ", ".join(f"{k}={v!r}" for k, v in json.loads(a["api_param"]).items())
                    piece(a["inner_thought"] + "\n" + "#### api call\n```python\n" + f"{a['api_name']}({kw})" +
                          "\n```  " + eos, False)
                    res = a["api_res"] if isinstance(a["api_res"], str) else json.dumps(a["api_res"], indent=2,
                                                                                       ensure_ascii=False)
                    piece("\n#### api output\n" + res + "\n", True)
                piece(f"### {ans}: ", True)
                piece(value["ans"] + "  " + eos, False)

    kind = ob["type"]
    if kind == "pretrain":
        piece(ob["text"], False)
    elif kind == "instruct":
        inp = "### Input:\n" + ob["input"] + "\n\n" if ob.get("input", "").strip() else ""
        piece("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n" + ob["instruct"] +
              "\n\n" + inp + "### Response:\n", True)
        piece(ob["output"] + "\n" + eos, False)
    elif kind == "conversation":
        piece("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions. \n\n", True)
        rounds(ob["rounds"], "Human", "Assistent")
    elif kind == "ref_qa":
        piece("Generate responses to the given instruction series according to the reference text. \n\n"
              f"### Reference: \n{ob['reference']}\n\n", True)
        rounds(ob["rounds"], "Instruction", "Response")
    else:
        piece("Answer the following questions as best as you can. You have access to the following tool(s):\n" +
              json.dumps(ob["api_desc"], indent=2, ensure_ascii=False), True)
        rounds(ob["rounds"], "Human", "Assistent")
    return ids, labels


@pytest.mark.parametrize("index", range(len(README_SAMPLES)), ids=[s["type"] for s in README_SAMPLES])
def test_gdgpt_template_is_gdgpts_text_token_for_token(index, gd_tok):
    from data.samples import parse_sample
    from data.tokenize import encode

    ob, tok = README_SAMPLES[index], gd_tok
    ids, labels = gdgpt_reference(ob, tok)
    got = encode(parse_sample(ob), tok, 100_000, "gdgpt")
    eos = tok.eos_token_id
    if ob["type"] == "pretrain":  # gdGPT ended pretrain text without EOS; every sample ends with one here
        ids, labels = ids + [eos], labels + [eos]
    # (gdGPT's truncate_and_pad appended a second EOS to every other sample: not copied)
    assert got.ids.tolist() == ids
    assert got.target.tolist() == [lab != -100 for lab in labels]
    assert ids[0] != tok.bos_token_id and ids[-1] in (eos, tok("\n", add_special_tokens=False)["input_ids"][-1])


def test_gdgpt_pieces_are_tokenized_apart(gd_tok):
    """Why piece by piece: a sentencepiece tokenizer gives other ids for the joined text."""
    from data.samples import parse_sample
    from data.templates import render
    from data.tokenize import encode

    sample = parse_sample(README_SAMPLES[3])
    text = "".join(s.text for s in render(sample, "gdgpt", gd_tok))
    assert text.startswith("A chat between") and "### Human: Who is caixukun? \n### Human: caixukun is" in text
    whole = gd_tok(text, add_special_tokens=False)["input_ids"]
    assert encode(sample, gd_tok, 100_000, "gdgpt").ids.tolist() != whole


def test_gdgpt_prompts_and_chat_history(gd_tok):
    from data.gdgpt_template import format_call, parse_call
    from data.templates import render_prompt
    from data.tokenize import prompt_token_ids

    tok = gd_tok
    prompt = {"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Hi"], ["ask", "Who?"]]}
    full = {"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Hi"], ["ask", "Who?"], ["ans", "Me"]]}
    ids, _ = gdgpt_reference(full, tok)
    head = ids[:len(ids) - len(tok("Me </s>\n", add_special_tokens=False)["input_ids"])]
    assert prompt_token_ids(prompt, tok, "gdgpt") == head  # what the model saw before its answer, exactly
    assert render_prompt(prompt, "gdgpt", tok).endswith("### Human: Who? \n### Assistent: ")
    instruct = render_prompt({"type": "instruct", "instruct": "Say hi."}, "gdgpt", tok)
    assert instruct.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "paired with an input" in instruct
    call = format_call("search", json.dumps({"query": "it's", "n": 3, "exact": True}))
    assert call == "search(query=\"it's\", n=3, exact=True)"
    parsed = parse_call("I look it up\n#### api call\n```python\n" + call + "\n```  ")
    assert parsed["api_name"] == "search" and json.loads(parsed["api_param"]) == {"query": "it's", "n": 3, "exact": True}
    assert parse_call("no call here") is None


def test_demo_gdgpt_invocation_and_template(gdgpt_llama, tmp_path, capsys, monkeypatch):
    """gdGPT's `deepspeed --num_gpus 4 --num_nodes 1 demo.py`: no --model, its ./checkpoints; a gdGPT
    checkpoint is served in gdGPT's layout."""
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"type": "conversation", "rounds": [["ask", "Hello"]]}) + "\n")
    code, _, err = cli("demo", ["--prompts", "p.jsonl"], capsys)
    assert code == 2 and "--model is required (no checkpoints here" in err
    shutil.copytree(gdgpt_llama[1], tmp_path / "checkpoints")  # gdGPT's training output at its default save_path
    monkeypatch.setenv("RANK", "0")
    code, _, err = cli("demo", ["--prompts", "p.jsonl", "--output", "a.jsonl", "--max-new-tokens", "4",
                                "--local_rank=0"], capsys)
    assert code == 0, err
    assert "gdGPT's layout (--template gdgpt" in err and json.loads((tmp_path / "a.jsonl").read_text())["n_tokens"] > 0


def test_gdgpt_chat_api_round_trip(gd_tok):
    """conver_has_api under gdGPT's layout: the call ends at EOS, the tool's result enters as gdGPT's
    "#### api output" piece, and the history renders as the training sample would."""
    from engine.inference.generate import Chat, SamplingConfig

    tok = gd_tok
    call = "I look\n#### api call\n```python\nsearch(query='x')\n```  "
    script = tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    final = tok("Found.  ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    class Scripted:  # plays the call, then (after the tool) the final answer
        def __init__(self):
            self.prompts, self.todo = [], [script, final]

        def reset(self):
            self.played = None

        def next_logits(self, new_ids):
            if self.played is None:
                self.prompts.append(list(new_ids))
                self.played, self.seq = 0, self.todo.pop(0)
            logits = torch.zeros(len(tok))
            logits[self.seq[min(self.played, len(self.seq) - 1)]] = 1.0
            self.played += 1
            return logits

    lm = Scripted()
    chat = Chat(lm, tok, "conver_has_api", SamplingConfig(max_new_tokens=80), template="gdgpt", api_desc="search: s")
    seen = []
    chat.ask("Find x", observe=lambda text: seen.append(text) or "42")
    assert len(seen) == 1 and len(lm.prompts) == 2
    history = {"type": "conver_has_api", "api_desc": "search: s", "rounds": chat.rounds}
    assert chat.rounds[-1][0] == "ans-api" and chat.rounds[-1][1]["ans"] == "Found."
    expected, _ = gdgpt_reference(history, tok)
    second = lm.prompts[1]
    assert expected[:len(second)] == second  # the continued prompt is the training layout of the call + result
    shown = tok.decode(second)  # (pieces tokenized apart decode with sentencepiece's leading spaces)
    assert "```  </s>\n#### api output\n42\n" in shown and shown.rstrip().endswith("### Assistent:")


# ---------------------------------------------------------------------- hub ids (offline: a local HF cache)
def hf_cache_with(hf_dir: Path, cache: Path, repo_id: str, revision="0f3d5e7a") -> Path:
    """`repo_id` in a cache laid out as huggingface_hub writes it: blobs/, snapshots/<rev>/ of
    symlinks to them, refs/main naming the revision."""
    import os
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in sorted(hf_dir.iterdir()):
        blob = repo / "blobs" / f"{abs(hash(f.name)):x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


def test_hub_ids_from_the_local_cache_offline(tiny_pp, tmp_path, capsys, monkeypatch):
    from engine.checkpoints.files import locate

    hf = Path(tiny_pp).parent / "hf"
    hf_cache_with(hf, tmp_path / "cache", "tiny-org/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli("convert_model", ["hg_to_pp", "--input-path", "tiny-org/tiny-llama", "--save-path",
                                           str(tmp_path / "pp")], capsys)
    assert code == 0, err
    assert locate(tmp_path / "pp").layers(None).name == "global_step0"
    code, out, err = cli("convert_model", ["download", "--model-name", "tiny-org/tiny-llama", "--save-path",
                                           str(tmp_path / "dl")], capsys)
    assert code == 0, err
    got = tmp_path / "dl"
    assert {p.name for p in got.iterdir()} == {p.name for p in hf.iterdir()} and not (got / "config.json").is_symlink()
    assert (got / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    code, _, err = cli("convert_model", ["hg_to_pp", "--input-path", "tiny-org/not-cached", "--save-path",
                                         str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("\n") == 1 and "tiny-org/not-cached: not a local dir and not in" in err
    assert "HF_HUB_OFFLINE is set" in err and not (tmp_path / "x").exists()
    code, _, err = cli("convert_model", ["download", "--model-name", "tiny-org/tiny-llama", "--save-path",
                                         str(got)], capsys)
    assert code == 2 and "already exists and is not empty" in err
