"""engine/checkpoints/weights.py: the one weight loader behind training, conversion and generation."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoints import files
from engine.checkpoints.files import LayoutError, ModelDir, locate
from engine.checkpoints.weights import open_weights


@pytest.fixture(scope="module")
def bloom_dirs(tmp_path_factory):
    """A tiny bloom HF dir, and the same weights stored as bigscience's hub checkpoints are: base
    model keys without 'transformer.' (the head is tied, so no 'lm_head.weight' either)."""
    from models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("bloom")
    hf = make_tiny_hf_model(root / "hf", "bloom", seed=7)
    bare = root / "bare"
    shutil.copytree(hf, bare)
    state = load_file(bare / "model.safetensors")
    assert any(k.startswith("transformer.") for k in state)
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, bare / "model.safetensors",
              metadata={"format": "pt"})
    return hf, bare


def test_bigscience_bloom_dir_loads_in_demo_and_conversion(bloom_dirs, tmp_path):
    import demo
    from engine.checkpoints.convert import hf_to_pp

    hf, bare = bloom_dirs
    want, got = open_weights(hf), open_weights(bare)
    for idx in range(len(want)):
        a, b = want.layer(idx), got.layer(idx)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"type": "pretrain", "text": "hello"}) + "\n")
    answers = {}
    for name, src in (("hf", hf), ("bare", bare)):
        demo.main(["--model", str(src), "--prompts", str(prompts), "--output", str(tmp_path / f"{name}.jsonl"),
                   "--max-new-tokens", "4"])
        answers[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert answers["bare"] == answers["hf"] and answers["hf"].strip()
    pp = hf_to_pp(bare, tmp_path / "pp")
    a, b = open_weights(pp).layer(1), want.layer(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layer_source_checks_and_tags(tiny_pp):
    hf = tiny_pp.parent / "hf"
    with pytest.raises(LayoutError, match="has no checkpoint tags"):
        open_weights(hf, tag="global_step0")
    with pytest.raises(LayoutError, match="global_step9"):
        open_weights(tiny_pp, tag="global_step9")
    pp, from_hf = open_weights(tiny_pp), open_weights(hf)
    assert pp.where.hf_dir == tiny_pp / "hf" and from_hf.where.is_hf and not pp.where.is_hf
    for idx in range(len(pp)):  # the pipeline dir holds exactly what the HF dir maps to
        a, b = pp.layer(idx), from_hf.layer(idx)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_layout_is_one_detector(tiny_pp, tmp_path, monkeypatch):
    """A foreign checkpoint tree (layer files at its root, no `latest`) needs only a detector in LAYOUTS."""
    flat = tmp_path / "flat"
    shutil.copytree(tiny_pp / "global_step0", flat)
    shutil.copytree(tiny_pp / "hf", flat / "hf")
    with pytest.raises(LayoutError, match="neither a pipeline checkpoint dir"):
        locate(tmp_path / "nothing")

    def detect(path):
        return ModelDir(path, path / "hf", lambda tag: path) if (path / "layer_00-model_states.pt").is_file() else None

    monkeypatch.setattr(files, "LAYOUTS", [detect, *files.LAYOUTS])
    source = open_weights(flat)
    source.verify()
    assert torch.equal(source.layer(0)["embed_tokens.weight"], open_weights(tiny_pp).layer(0)["embed_tokens.weight"])
