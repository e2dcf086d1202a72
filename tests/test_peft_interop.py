"""PEFT adapters in and out (engine/checkpoints/lora.py, models/lora.py): adapter dirs that peft's
own save_pretrained wrote load in demo (over an HF or a pipeline dir) and merge in pp_to_hg with
PeftModel's logits and merged weights, for PEFT's common options (rsLoRA, regex / all-linear
targets, layers_to_transform, init_lora_weights, DoRA on fused q/k/v); an adapter for another base
or with an option we do not implement is one line naming the field; --dtype float32 merges in fp32."""
import json
from pathlib import Path

import pytest
import torch

from engine.checkpoints.files import LayoutError
from tests.conftest import run_main
from tests.test_families import load_reference

ATOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama HF dir (fused q/k/v and gate/up on our side, separate in HF) and its pipeline dir."""
    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("peft_base")
    hf = make_tiny_hf_model(root / "hf", "llama", ["a b c d e f g h"] * 8)
    return hf, hf_to_pp(hf, root / "pp")


def peft_adapter(hf: Path, out: Path, seed: int = 0, **options):
    """A PEFT adapter saved by peft itself, its B (and DoRA magnitudes, modules_to_save) random (a zero
    B would hide a wrong A, slice or scale); returns (dir, the PeftModel)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_reference(hf), LoraConfig(r=4, lora_alpha=8, **options))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    model.save_pretrained(out)
    return out, model.eval()


IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
OPTIONS = {
    "qv": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "all_linear_rslora": dict(target_modules="all-linear", use_rslora=True),
    "regex": dict(target_modules=r".*\.layers\.[13]\..*(k_proj|down_proj)"),
    "layers_gaussian": dict(target_modules=["q_proj", "gate_proj", "o_proj"], layers_to_transform=[0, 2],
                            init_lora_weights="gaussian"),
    "dora": dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], use_dora=True, use_rslora=True),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_peft_adapter_in_demo_and_merge_equals_peftmodel(base, tmp_path, name):
    from peft import PeftModel

    from engine.checkpoints.convert import pp_to_hg
    from engine.inference.generate import load_lm

    hf, pp = base
    adapter, peft = peft_adapter(hf, tmp_path / "adapter", **OPTIONS[name])
    with torch.no_grad():
        theirs = peft(input_ids=IDS, use_cache=False).logits
        plain = load_reference(hf)(input_ids=IDS, use_cache=False).logits
        assert (theirs - plain).abs().max() > 1e-3  # the adapter changes the output
        for model in (hf, pp):  # demo --model M --adapter DIR over an HF dir and over a pipeline dir
            ours = load_lm(model, "ours", ["cpu"], "float32", adapter=adapter).model(IDS)
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        ours = load_lm(adapter, "ours", ["cpu"], "float32").model(IDS)  # the adapter alone: its base_model_name_or_path
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        if name == "qv":  # --backend hf: peft's own PeftModel on transformers' model
            hf_lm = load_lm(hf, "hf", ["cpu"], "float32", adapter=adapter)
            assert isinstance(hf_lm.model, PeftModel)
            torch.testing.assert_close(hf_lm.model(input_ids=IDS, use_cache=False).logits, theirs, atol=ATOL, rtol=0)

    # pp_to_hg --merge-lora --adapter: equal to peft's merge_and_unload, tensor by tensor
    src = pp if name != "qv" else hf
    merged = pp_to_hg(src, tmp_path / "merged", dtype="float32", merge_lora=True, adapter=adapter)
    want = PeftModel.from_pretrained(load_reference(hf), adapter).merge_and_unload().state_dict()
    got = load_reference(merged).state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0, msg=k)


def test_fp32_merge_of_a_bf16_base_is_not_rounded(tmp_path):
    """--merge-lora --dtype float32 over a bf16 model: the bf16 base widened exactly, the adapter
    added in fp32 (merging in bf16 and widening after was ~1e-3 off per weight)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from convert_model import main as convert
    from models.tiny import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "hf", "llama", ["a b c d"] * 8)
    AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for f in hf.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (tmp_path / "bf16" / f.name).write_bytes(f.read_bytes())
    adapter, _ = peft_adapter(tmp_path / "bf16", tmp_path / "adapter", target_modules="all-linear")
    code = convert(["pp_to_hg", "--input-path", str(adapter), "--save-path", str(tmp_path / "m32"), "--merge-lora",
                    "--dtype", "float32"]) or 0
    assert code == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    want = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    got = load_reference(tmp_path / "m32")
    assert got.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=IDS).logits, want(input_ids=IDS).logits, atol=ATOL, rtol=0)


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapters_for_another_base_or_with_unknown_options_are_one_line(base, tmp_path, capsys):
    from demo import main as demo
    from models.tiny import make_tiny_hf_model

    hf, pp = base
    adapter, _ = peft_adapter(hf, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    wide = make_tiny_hf_model(tmp_path / "wide", "llama", ["a b c d"] * 8, hidden_size=96)
    deep = make_tiny_hf_model(tmp_path / "deep", "llama", ["a b c d"] * 8, num_hidden_layers=6)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello"\n')
    cases = [
        (hf, peft_adapter(wide, tmp_path / "a_wide", target_modules=["q_proj"])[0], "hidden size"),
        (hf, peft_adapter(deep, tmp_path / "a_deep", target_modules=["q_proj"])[0], "layer count"),
        (hf, _edit_config(adapter, tmp_path / "a_targets", target_modules=["q_proj"]), "targets differ"),
        (hf, _edit_config(adapter, tmp_path / "a_r", r=8), "r 4, adapter_config.json's r is 8"),
        (hf, _edit_config(adapter, tmp_path / "a_unknown", lora_magic=1), "lora_magic: not a field of PEFT's LoraConfig"),
        (hf, _edit_config(adapter, tmp_path / "a_fan", fan_in_fan_out=True), "fan_in_fan_out: true is not implemented"),
        (hf, _edit_config(adapter, tmp_path / "a_pissa", init_lora_weights="pissa"), "init_lora_weights: \"pissa\""),
        (hf, _edit_config(adapter, tmp_path / "a_rank", rank_pattern={"q_proj": 8}), "rank_pattern: "),
        (hf, _edit_config(adapter, tmp_path / "a_mods", target_modules=["w1"]), "target_modules: 'w1' is no adaptable"),
    ]
    benign = _edit_config(adapter, tmp_path / "benign", bias="none", revision=None, task_type="CAUSAL_LM",
                          inference_mode=False, fan_in_fan_out=False, exclude_modules=None)
    assert run_main(demo, ["--model", str(hf), "--adapter", str(benign), "--prompts", str(prompts), "--max-new-tokens",
                           "2", "--devices", "cpu"], capsys)[0] == 0
    for model, bad, message in cases:
        code, _, err = run_main(demo, ["--model", str(model), "--adapter", str(bad), "--prompts", str(prompts),
                                       "--devices", "cpu"], capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (message, err)
        assert message in err and str(bad) in err, (message, err)


def test_config_keys_match_peft_options_and_refusals(base):
    from engine.config import ConfigError, apply_overrides, from_dict, validate
    from engine.model import Model
    from engine.training.backends import lora_spec
    from tests.test_lora import _cfg

    hf, _ = base
    model = Model.from_dir(hf)
    raw = apply_overrides(_cfg(r=8, alpha=16), ["lora.use_rslora=true", "lora.use_dora=true",
                                                "lora.init_lora_weights=gaussian", "lora.layers_to_transform=[1, 3]",
                                                r"lora.target_modules=.*\.(q|v)_proj"])
    spec = lora_spec(from_dict(raw, "x.yml"), model)
    assert spec.scaling == pytest.approx(16 / 8 ** 0.5) and spec.use_dora and spec.init_lora_weights == "gaussian"
    for over, message in (
        ({"init_lora_weights": "pissa"}, "lora.init_lora_weights must be true, false or gaussian"),
        ({"target_modules": "(q_proj"}, "lora.target_modules: '(q_proj' is not a regex"),
        ({"target_modules": r".*q_proj", "layers_to_transform": [0]}, "lora.layers_to_transform does not apply to a regex"),
        ({"use_dora": True, "zero_optimization": {"stage": 3}}, "lora.use_dora needs each adapted weight whole"),
    ):
        zero = over.pop("zero_optimization", None)
        raw = _cfg(r=8, **over)
        if zero:
            raw.update(zero_optimization=zero, model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}})
        with pytest.raises(ConfigError) as e:
            validate(from_dict(raw, "x.yml"), 2, 6, pipeline=not zero)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    for over, message in (({"target_modules": r"lm_head"}, "the regex 'lm_head' matches no adaptable linear"),
                          ({"target_modules": ["q_proj"], "layers_to_transform": [9]}, "block 9 is not in this llama")):
        with pytest.raises(ConfigError) as e:
            lora_spec(from_dict(_cfg(r=8, **over), "x.yml"), model)
        assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_fresh_adapters_are_initialised_as_peft_initialises_them(base, init):
    """Same distributions as PeftModel's fresh adapters (seeds differ): B zero unless false; A's bound or std."""
    from peft import LoraConfig, get_peft_model

    from models.lora import LoraSpec, add_lora
    from tests.test_families import ours

    hf, _ = base
    model, _, m = ours(hf)
    add_lora(model.owned_layers(), m.family, m.args, LoraSpec(r=4, target_modules=("q_proj",), init_lora_weights=init), 0)
    mine = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    theirs = {n: p for n, p in get_peft_model(load_reference(hf), LoraConfig(r=4, target_modules=["q_proj"],
                                                                               init_lora_weights=init)).named_parameters()
              if ".lora_" in n}
    for kind in ("lora_A", "lora_B"):
        a = torch.cat([p.flatten() for n, p in mine.items() if f".{kind}." in n])
        b = torch.cat([p.flatten() for n, p in theirs.items() if f".{kind}." in n])
        assert a.numel() == b.numel()
        assert (a.abs().max() == 0) == (b.abs().max() == 0), kind
        if b.abs().max() > 0:
            assert a.std().item() == pytest.approx(b.std().item(), rel=0.15), kind
            assert a.abs().max() <= b.abs().max() * 1.5 and b.abs().max() <= a.abs().max() * 1.5, kind


def test_unknown_adapter_dir_is_one_line(base, tmp_path):
    from engine.checkpoints.lora import open_adapter
    from engine.model import Model

    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError) as e:
        open_adapter(tmp_path / "empty", Model.from_dir(base[0]))
    assert "neither a PEFT adapter dir" in str(e.value)


@pytest.mark.parametrize("name", ["dora", "all_linear_rslora"])
def test_adapter_gradients_equal_peftmodel(base, tmp_path, name):
    """Training runs the same function: the gradients of every adapter tensor (DoRA's magnitudes
    included) equal PeftModel's within 1e-5 relative (fp32, no dropout; the gradients are O(10))."""
    from engine.inference.generate import load_lm
    from models.lora import peft_name

    hf, _ = base
    adapter, peft = peft_adapter(hf, tmp_path / "adapter", **OPTIONS[name])
    weight = torch.randn(2, 12, 320, generator=torch.Generator().manual_seed(3))
    peft.train()
    (peft(input_ids=IDS, use_cache=False).logits * weight).sum().backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in peft.named_parameters() if p.requires_grad}
    lm = load_lm(hf, "ours", ["cpu"], "float32", adapter=adapter)
    model = lm.model.train()
    (model(IDS) * weight).sum().backward()
    keys, n = lm.family.hf_keys(lm.args), 0
    for idx, layer in model.owned_layers():
        for pname, p in layer.named_parameters():
            if p.requires_grad:
                key = peft_name(keys[idx], pname)  # peft's module parameter: DoRA's magnitude is a `.weight` there
                key = key if key.endswith(".weight") else key + ".weight"
                torch.testing.assert_close(p.grad, theirs[key], atol=ATOL, rtol=ATOL, msg=lambda m: f"{pname}: {m}")
                n += 1
    assert n == len(theirs) and n > 0
