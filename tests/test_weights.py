"""engine/checkpoints/weights.py: the one weight loader behind training, conversion and generation."""
import json
import os
import shutil
import subprocess

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


# ---------------------------------------------------------------- HF dirs as other tools leave them
def _dup_in_second_shard(d):
    """The first shard's first tensor also, with other values, in the second shard (a re-save into
    the same dir, a mixed download)."""
    shards = sorted(d.glob("model-*.safetensors"))
    first, second = load_file(shards[0]), load_file(shards[1])
    key = sorted(first)[0]
    second[key] = torch.zeros_like(first[key])
    save_file(second, shards[1], metadata={"format": "pt"})


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _hub_snapshot(src, root):
    """huggingface_hub's cache layout: snapshots/<rev>/<file> symlinks into blobs/<sha256>."""
    import hashlib

    repo = root / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snap


@pytest.fixture(scope="module")
def hf_layouts(tiny_pp, tmp_path_factory):
    """{case: (dir, expect)}: the tiny llama HF dir rewritten as hub downloads, save_pretrained of
    several versions and other tools leave it. expect None: converts to the same weights;
    else substrings of the one error line of hg_to_pp, or ("verify", substrings) when only
    `convert_model.py verify` is to object (the conversion reads through the index)."""
    from transformers import AutoModelForCausalLM

    ref = tiny_pp.parent / "hf"
    root = tmp_path_factory.mktemp("layouts")
    model = AutoModelForCausalLM.from_pretrained(ref)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    side = [f for f in ref.iterdir() if not f.name.endswith(".safetensors")]
    cases = {}

    def new(name, weights=True):
        d = root / name
        if weights:
            shutil.copytree(ref, d)
        else:
            d.mkdir()
            for f in side:
                shutil.copy(f, d)
        return d

    sharded = root / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in side:
        if not (sharded / f.name).exists():
            shutil.copy(f, sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    cases["sharded"] = (sharded, None)

    def from_sharded(name, damage, expect):
        d = root / name
        shutil.copytree(sharded, d)
        damage(d)
        cases[name] = (d, expect)

    index = "model.safetensors.index.json"
    from_sharded("index-names-a-missing-shard", lambda d: sorted(d.glob("model-*"))[1].unlink(),
                 ["model-00002-of-", "listed in the index is missing"])
    from_sharded("shard-key-not-in-index", lambda d: _edit_json(d / index, lambda i: i["weight_map"].pop(
        "model.layers.0.mlp.down_proj.weight")), [index, "does not list tensor 'model.layers.0.mlp.down_proj"])
    from_sharded("duplicate-keys-indexed", _dup_in_second_shard, ("verify", ["model-00002-of-", "the index lists"]))
    from_sharded("duplicate-keys-no-index", lambda d: (_dup_in_second_shard(d), (d / index).unlink()),
                 ["model-00002-of-", "is also in model-00001-of-", "no index says which"])
    from_sharded("index-extra-metadata", lambda d: _edit_json(d / index, lambda i: i["metadata"].update(
        format="pt", total_parameters=1, mergekit_version="0.1")), None)
    from_sharded("index-metadata-null", lambda d: _edit_json(d / index, lambda i: i.update(metadata=None)), None)
    from_sharded("index-total-size-garbage", lambda d: _edit_json(d / index, lambda i: i["metadata"].update(
        total_size="12 GB")), ("verify", [index, "total_size is \"12 GB\", not a number"]))
    from_sharded("index-weight-map-list", lambda d: _edit_json(d / index, lambda i: i.update(weight_map=[])),
                 [index, "'weight_map' must map"])

    d = new("bin-only", weights=False)  # transformers 4's default before safetensors
    torch.save(state, d / "pytorch_model.bin")
    cases["bin-only"] = (d, None)
    d = new("bin-sharded", weights=False)
    keys = sorted(state)
    names = {k: f"pytorch_model-0000{1 + (i >= len(keys) // 2)}-of-00002.bin" for i, k in enumerate(keys)}
    for name in set(names.values()):
        torch.save({k: state[k] for k in keys if names[k] == name}, d / name)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": names}))
    cases["bin-sharded"] = (d, None)
    d = new("bin-and-safetensors")  # the safetensors copy wins, as in transformers: the .bin is never read
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, d / "pytorch_model.bin")
    cases["bin-and-safetensors"] = (d, None)
    d = new("mixed-dtypes")
    tensors = load_file(d / "model.safetensors")
    save_file({k: v.to((torch.float16, torch.bfloat16, torch.float32)[i % 3]) for i, (k, v) in
               enumerate(sorted(tensors.items()))}, d / "model.safetensors", metadata={"format": "pt"})
    cases["mixed-dtypes"] = (d, None)
    for name, edit in {"config-torch_dtype-v4": lambda c: (c.pop("dtype", None), c.update(torch_dtype="float16")),
                       "config-no-architectures": lambda c: c.pop("architectures", None),
                       "config-rope-type-v4": lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}),
                       "config-newer-keys": lambda c: c.update(layer_types=["full_attention"] * 4,
                                                               future_option={"x": 1})}.items():
        d = new(name)
        _edit_json(d / "config.json", edit)
        cases[name] = (d, None)
    d = new("tokenizer-model-only")
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) and f.name != "tokenizer.model":
            f.unlink()
    cases["tokenizer-model-only"] = (d, None)
    d = new("trainer-checkpoint-100")  # HF Trainer + DeepSpeed: DeepSpeed's `latest` beside the HF weights
    (d / "latest").write_text("global_step100")
    (d / "global_step100").mkdir()
    torch.save({"module": {}}, d / "global_step100" / "mp_rank_00_model_states.pt")
    cases["trainer-checkpoint-100"] = (d, None)
    cases["hub-cache-snapshot"] = (_hub_snapshot(ref, root), None)
    cases["space ünï 模型"] = (new("space ünï 模型"), None)
    return ref, cases


def test_hf_dirs_from_other_tools_convert_or_fail_in_one_line(hf_layouts, tmp_path, capsys):
    from convert_model import main
    from tests.conftest import run_main

    ref, cases = hf_layouts
    want = open_weights(ref)
    for name, (src, expect) in cases.items():
        out = tmp_path / name
        code, _, err = run_main(main, ["hg_to_pp", "--input-path", str(src), "--save-path", str(out)], capsys)
        vcode, _, verr = run_main(main, ["verify", str(src)], capsys)
        if expect is None or expect[0] == "verify":
            assert code == 0, (name, err)
            got = open_weights(out)
            for idx in range(len(want)):
                a, b = got.layer(idx), want.layer(idx)
                assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in b), (name, idx)
            if expect is None:
                assert vcode == 0, (name, verr)
            else:
                lines = verr.splitlines()
                assert vcode == 2 and len(lines) == 1 and all(e in lines[0] for e in expect[1]), (name, verr)
        else:
            lines = [l for l in err.splitlines() if l.startswith("error: ")]
            assert code == 2 and len(lines) == 1 and all(e in lines[0] for e in expect), (name, err)
            assert not out.exists(), name
            assert "Traceback" not in err + verr


def test_read_only_model_dir_is_only_read(hf_layouts, tmp_path, capsys):
    """chmod -w (root ignores it: then a read-only bind mount): conversion, verify and demo only read."""
    import demo
    from convert_model import main
    from tests.conftest import run_main

    ref, _ = hf_layouts
    src = tmp_path / "ro"
    shutil.copytree(ref, src)
    for f in [*src.iterdir(), src]:
        f.chmod(0o555 if f.is_dir() else 0o444)
    mounted = False
    try:
        if os.geteuid() == 0:
            mounted = subprocess.run(["mount", "--bind", str(src), str(src)], capture_output=True).returncode == 0
            if mounted:
                subprocess.run(["mount", "-o", "remount,bind,ro", str(src)], check=True)
        if os.geteuid() == 0 and not mounted:
            pytest.skip("root without mount: the dir cannot be made read-only")
        with pytest.raises(OSError):
            (src / "probe").write_text("x")
        assert run_main(main, ["hg_to_pp", "--input-path", str(src), "--save-path", str(tmp_path / "pp")],
                        capsys)[0] == 0
        assert run_main(main, ["verify", str(src)], capsys)[0] == 0
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"type": "pretrain", "text": "hello"}) + "\n")
        demo.main(["--model", str(src), "--prompts", str(prompts), "--output", str(tmp_path / "a.jsonl"),
                   "--max-new-tokens", "2"])
        assert (tmp_path / "a.jsonl").read_text().strip()
    finally:
        if mounted:
            subprocess.run(["umount", str(src)], check=True)
        for f in [src, *src.iterdir()]:
            f.chmod(0o755 if f.is_dir() else 0o644)


def test_damaged_generation_config_is_one_line_in_demo(hf_layouts, tmp_path, capsys):
    import demo
    from tests.conftest import run_main

    ref, _ = hf_layouts
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"type": "pretrain", "text": "hello"}) + "\n")
    for name, text, expect in (("garbage", "{eos_token_id: 2", "line 1: not valid JSON"),
                               ("list", "[2]", "must be a JSON object"),
                               ("eos-text", '{"eos_token_id": "</s>"}', "eos_token_id must be a token id")):
        src = tmp_path / name
        shutil.copytree(ref, src)
        (src / "generation_config.json").write_text(text)
        code, _, err = run_main(demo.main, ["--model", str(src), "--prompts", str(prompts), "--output",
                                            str(tmp_path / f"{name}.jsonl"), "--max-new-tokens", "2"], capsys)
        assert code == 2 and err.startswith(f"error: {src / 'generation_config.json'}: ") and expect in err, err
