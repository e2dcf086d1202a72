"""LoRA (models/lora.py, engine/checkpoints/lora.py): every family's adapters export as a PEFT
adapter that peft itself loads with our logits, merged exports equal peft's merge; training
under pp=2 changes only the adapters, saves only them, resumes on another layout; ZeRO; config errors."""
import json
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, from_dict, validate
from models import family_names, get_family
from models.lora import LoraSpec, add_lora, merge
from models.pipeline import SequentialModel
from tests.test_families import load_reference, logits_of, make_hf_dir, ours
from tests.test_train import config, run

ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("lora_families"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_hf_dir(name, root / name)
        return built[name]
    return get


def _adapted(path: Path, spec: LoraSpec):
    """Our model of the dir with adapters whose B is random (a zero B would hide a wrong A or slice)."""
    model, _, m = ours(path)
    add_lora(model.owned_layers(), m.family, m.args, spec, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (p if ".lora_" not in name else 0))
    states = {idx: {n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
              for idx, layer in model.owned_layers()}
    return model, m, {i: s for i, s in states.items() if s}


@pytest.mark.parametrize("name", family_names())
def test_adapter_export_loads_in_peft_and_merge_equals_peft_merge(hf_dir, name, tmp_path):
    from peft import PeftModel

    from engine.checkpoints.lora import write_peft

    path = hf_dir(name)
    saves = ("lm_head",) if name == "llama" else ()
    spec = LoraSpec(r=4, alpha=8.0, target_modules="all-linear", modules_to_save=saves)
    model, m, states = _adapted(path, spec)
    write_peft(tmp_path / "adapter", m.family, m.args, spec, states, str(path))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["task_type"] == "CAUSAL_LM"
    ids = torch.randint(3, m.dims.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = logits_of(model.eval()(ids))
        peft = PeftModel.from_pretrained(load_reference(path), tmp_path / "adapter").eval()
        theirs = peft(input_ids=ids, use_cache=False).logits
        base = load_reference(path)(input_ids=ids, use_cache=False).logits
    assert (mine - base).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    n_pairs = sum(1 for s in states.values() for k in s if ".lora_A." in k)
    assert n_pairs == sum(1 for k in peft.state_dict() if ".lora_A." in k)  # one pair per HF target

    # merged: our base + adapters merged per layer == peft's merge_and_unload
    merged = SequentialModel(m.family, m.args).eval()
    src, keys = ours(path)[0], m.family.hf_keys(m.args)
    for idx, layer in merged.owned_layers():
        base_state = dict(src._modules[str(idx)].state_dict())
        layer.load_state_dict(merge(keys[idx], base_state, states.get(idx, {}), spec.scaling))
    with torch.no_grad():
        unloaded = peft.merge_and_unload()(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(logits_of(merged(ids)), unloaded, atol=ATOL, rtol=0)
