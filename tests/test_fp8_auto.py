"""`fp8: auto` (the default): fp8 tensorwise only at a shape measured faster (engine/plan.py
FP8_SPEEDUP, by hidden size and micro-batch, compiled blocks, dense models) on a machine that runs
FP8 (compute capability >= 8.9, torchao); the start's note line and the dry run say which and why."""
import json
import sys
import types

import pytest
import torch

from engine.config import from_dict
from models import get_family
from tests.test_config import base

BF16 = {"enabled": True}
LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=4096)


def dims(family="llama", **over):
    fam = get_family(family)
    hf = {**LLAMA_7B, **over}
    if family == "mixtral":
        hf.update(model_type="mixtral", num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
    return fam.dims(fam.Args.from_hf_config(hf))


def cfg(**over):
    return from_dict(base(**{"bf16": BF16, "compile_blocks": True, "train_micro_batch_size_per_gpu": 4, **over}), "x.yml")


@pytest.fixture
def h100(monkeypatch):
    """A GPU with FP8 tensor cores and torchao importable (stand-ins)."""
    from engine.training import deepspeed_setup

    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", types.ModuleType("torchao.float8"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(deepspeed_setup, "_SAID", set())
    return monkeypatch


def test_the_default_is_auto():
    assert from_dict(base(), "x.yml").fp8 == "auto"


@pytest.mark.parametrize("over, model, picked, why", [
    ({}, {}, True, "fp8 measured 1.18x bf16's speed at hidden 4096, micro 4: faster"),
    ({"train_micro_batch_size_per_gpu": 8}, {}, True, "1.37x bf16's speed at hidden 4096, micro 8"),
    ({"train_micro_batch_size_per_gpu": 2}, {"hidden_size": 2048, "num_attention_heads": 16}, False,
     "fp8 measured 0.82x bf16's speed at hidden 2048, micro 2: not faster"),
    ({"train_micro_batch_size_per_gpu": 2}, {}, False, "fp8 not measured at hidden 4096, micro 2"),
    ({}, {"hidden_size": 5120, "num_attention_heads": 40}, False, "fp8 not measured at hidden 5120, micro 4"),
    ({"compile_blocks": False}, {}, False, "measured with compiled blocks only"),
    ({"bf16": {"enabled": False}}, {}, False, "the run is fp32, fp8 needs bf16"),
])
def test_auto_picks_by_shape(h100, capsys, over, model, picked, why):
    from engine.training.deepspeed_setup import resolved_fp8

    c = cfg(**over)
    assert resolved_fp8(c, say=True, dims=dims(**model)) == ("tensorwise" if picked else "off")
    note = capsys.readouterr().err
    if c.dtype != "bf16":  # nothing to weigh: no note (it would stand before a bad input's one error line)
        assert "fp8: auto" not in note
        return
    assert f"note: fp8: auto -> {'tensorwise' if picked else 'off (bf16)'}: " in note and why in note


def test_auto_stays_bf16_for_moe_zero_and_machines_without_fp8(h100):
    from engine.training.deepspeed_setup import resolved_fp8

    assert resolved_fp8(cfg(), dims=dims("mixtral")) == "off"  # the experts would lose the fused wgrad
    assert resolved_fp8(cfg(), pipeline=False, dims=dims()) == "off"  # the ZeRO path has no fp8
    h100.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100
    assert resolved_fp8(cfg(), dims=dims()) == "off"
    h100.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    h100.setitem(sys.modules, "torchao", None)  # not installed: bf16, not an error
    assert resolved_fp8(cfg(), dims=dims()) == "off"
    assert resolved_fp8(cfg(fp8="rowwise"), dims=dims()) == "rowwise"  # explicit: as given


def test_auto_reads_the_model_and_switches_the_wgrad_fusion(h100, tmp_path):
    """Without dims the hidden size comes from model_path's config.json; where auto picks fp8 the
    fused fp32 wgrad accumulation is off (torchao's Float8Linear owns the linears), else on."""
    from engine.training.deepspeed_setup import layer_options
    from engine.training.grad_accum import wgrad_fusion

    for hidden, fp8 in ((4096, "tensorwise"), (2048, "off")):
        hf = tmp_path / str(hidden)
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(get_family("llama").tiny_hf_config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=hidden // 128)))
        c = cfg(model_path=str(hf), fp8_head=True)
        opts = layer_options(c)
        assert (opts.fp8, opts.fp8_head) == (fp8, fp8 != "off")
        assert wgrad_fusion(c) == (fp8 == "off")


def test_dry_run_says_what_auto_picked():
    """The dry run (engine/plan.py report) names auto's choice and why, from the config and model
    alone (it plans for an H100/H200)."""
    from engine.plan import report

    fam = get_family("llama")
    raw = base(bf16=BF16, compile_blocks=True, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=16,
               max_seq_len=2048, model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]},
                                             "parts": "auto"})
    for over, line in (({}, "fp8: auto -> tensorwise: fp8 measured 1.18x"),
                       ({"compile_blocks": False}, "fp8: auto -> off (bf16): fp8 is measured with compiled blocks"),
                       ({"fp8": "off"}, None)):
        text, _ = report(from_dict({**raw, **over}, "x.yml"), fam, fam.Args.from_hf_config(LLAMA_7B), 2)
        assert (line in text) if line else ("fp8: auto" not in text), text
