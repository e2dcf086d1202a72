"""HF <-> pipeline conversion: bit-exact round trip, loadable output, clean failures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoints.convert import hf_to_pp, pp_to_hg
from engine.checkpoints.files import LayoutError
from models.tiny import make_tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent


def hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "tiny", "llama", ["hello world"] * 8)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_bit_exact_and_loads(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_tiny_hf_model(tmp_path / "hf", "llama", ["hello world"] * 8, tie_word_embeddings=tie)
    hf_to_pp(src, tmp_path / "pp")
    assert (tmp_path / "pp" / "latest").read_text() == "global_step0"
    assert len(list((tmp_path / "pp" / "global_step0").glob("layer_*-model_states.pt"))) == 6 + tie
    if tie:  # DeepSpeed saves no file for a tied twin (its layer is a function): export must not need it
        (tmp_path / "pp" / "global_step0" / "layer_06-model_states.pt").unlink()
    pp_to_hg(tmp_path / "pp", tmp_path / "out", max_shard_bytes=64_000)  # forces several shards
    a, b = hf_tensors(src), hf_tensors(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ref = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.tensor([[1, 5, 9, 14]])
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello").input_ids == \
        AutoTokenizer.from_pretrained(src)("hello").input_ids


def _expect_failure_without_output(fn, out: Path, *message):
    with pytest.raises(LayoutError) as e:
        fn()
    for m in message:
        assert m in str(e.value)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_shape_mismatch_writes_nothing(tmp_path, tiny_hf):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_hf.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights say 128
    (bad / "config.json").write_text(json.dumps(cfg))
    _expect_failure_without_output(lambda: hf_to_pp(bad, tmp_path / "pp"), tmp_path / "pp",
                                   "mlp.gate_proj.weight' has shape [128, 64], config.json implies [96, 64]")


def test_wrong_family_is_named(tmp_path, tiny_hf):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_hf.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        hf_to_pp(bad, tmp_path / "pp")
    assert not (tmp_path / "pp").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_hf):
    hf_to_pp(tiny_hf, tmp_path / "pp")
    cfg_path = tmp_path / "pp" / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_size"], cfg["head_dim"] = 32, 8  # pretend the config belongs to a smaller model
    cfg_path.write_text(json.dumps(cfg))
    _expect_failure_without_output(lambda: pp_to_hg(tmp_path / "pp", tmp_path / "out"), tmp_path / "out",
                                   "layer_00-model_states.pt", "from another model")


def test_truncated_layer_file_is_named(tmp_path, tiny_hf):
    hf_to_pp(tiny_hf, tmp_path / "pp")
    victim = tmp_path / "pp" / "global_step0" / "layer_03-model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    _expect_failure_without_output(lambda: pp_to_hg(tmp_path / "pp", tmp_path / "out"), tmp_path / "out",
                                   "layer_03-model_states.pt: cannot be read")


def test_missing_tokenizer_and_existing_output(tmp_path, tiny_hf):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_hf.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).write_bytes(f.read_bytes())
    _expect_failure_without_output(lambda: hf_to_pp(bare, tmp_path / "pp"), tmp_path / "pp", "no tokenizer files")
    hf_to_pp(tiny_hf, tmp_path / "pp2")
    with pytest.raises(LayoutError, match="already exists"):
        hf_to_pp(tiny_hf, tmp_path / "pp2")


def test_cli_reports_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "nope"),
                        "--save-path", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no 'latest' file" in r.stderr
    assert not (tmp_path / "out").exists()


def test_layer_files_hold_fused_projections_and_old_unfused_files_still_load(tmp_path, tiny_hf):
    """hf_to_pp joins HF's q/k/v and gate/up into our fused tensors once. A pipeline checkpoint
    written before the fusion (separate q_proj/k_proj/v_proj, gate_proj/up_proj) still loads
    everywhere: export (bit-exact), the stage loader, and a layer's load_state_dict (what
    DeepSpeed's resume calls)."""
    from engine.checkpoints.files import layer_file, load_layer
    from engine.checkpoints.weights import open_weights
    from engine.model import Model
    from models.keymap import Fused
    from models.pipeline import SequentialModel

    hf_to_pp(tiny_hf, tmp_path / "pp")
    tag, model = tmp_path / "pp" / "global_step0", Model.from_dir(tmp_path / "pp")
    keys = model.family.hf_keys(model.args)
    fused = {idx: {k: v.clone() for k, v in load_layer(layer_file(tag, idx)).items()} for idx in range(len(keys))}
    assert {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"} <= set(fused[1])
    src = hf_tensors(tiny_hf)
    assert torch.equal(fused[1]["self_attn.qkv_proj.weight"], torch.cat(
        [src[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]))
    for idx, names in enumerate(keys):  # rewrite every file as the old version wrote it
        old = {}
        for ours, t in fused[idx].items():
            if isinstance(names[ours], Fused):
                old.update({k: p.clone() for k, p in zip(names[ours].old, names[ours].split(t))})
            else:
                old[ours] = t
        torch.save(old, layer_file(tag, idx))
    assert "self_attn.k_proj.weight" in load_layer(layer_file(tag, 1))

    pp_to_hg(tmp_path / "pp", tmp_path / "out")
    out = hf_tensors(tmp_path / "out")
    assert set(out) == set(src) and all(torch.equal(out[k], src[k]) for k in src)
    source = open_weights(tmp_path / "pp")
    seq = SequentialModel(model.family, model.args)
    for idx, layer in seq.owned_layers():
        assert all(torch.equal(source.layer(idx)[k], v) for k, v in fused[idx].items())
        layer.load_state_dict(load_layer(layer_file(tag, idx)))  # strict: old names are fused by the layer
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in fused[idx].items())
