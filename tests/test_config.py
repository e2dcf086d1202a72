"""Config parsing: shipped YAMLs validate, typos are named with a suggestion, cross-field rules hold."""
from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError, from_dict, load_config, to_dict, validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Pipeline layers (embedding + blocks + head) of the model each shipped config is written for.
MODEL_LAYERS = {
    "tiny_llama_cpu.yml": 6, "llama_7b_pp.yml": 34, "tiny_llama_lora_cpu.yml": 6,
    "tiny_bloom_cpu.yml": 6, "bloom_7b_pp.yml": 32,
    "tiny_mixtral_cpu.yml": 6, "mixtral_8x7b_pp.yml": 34,
    "tiny_baichuan_cpu.yml": 6, "baichuan2_7b_pp.yml": 34,
    "tiny_chatglm_cpu.yml": 6, "chatglm3_6b_pp.yml": 30,
}
ZERO_CONFIGS = {"ds_config_zero.yml": 34, "tiny_llama_zero_cpu.yml": 6}  # train_ds_zero.py: no pipeline


def base(**over):
    raw = {"model_path": "m", "data_path": "d.jsonl", "save_path": "s",
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    raw.update(over)
    return raw


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    cfg = load_config(path)
    dims = cfg.model_topo.process_topology.dims
    if path.name in ZERO_CONFIGS:
        validate(cfg, dims[0] * dims[1], ZERO_CONFIGS[path.name], pipeline=False)
        assert cfg.ds["train_batch_size"] == cfg.micro_batch * cfg.grad_accum * cfg.data_dim
        return
    assert path.name in MODEL_LAYERS, f"add {path.name} to MODEL_LAYERS with its model's pipeline layer count"
    validate(cfg, dims[0] * dims[1], MODEL_LAYERS[path.name])
    assert cfg.ds["train_batch_size"] == cfg.micro_batch * cfg.grad_accum * cfg.data_dim


def test_gdgpt_spelling_and_string_data_path():
    cfg = from_dict(base(n_epoches=3))
    assert cfg.n_epochs == 3 and cfg.data_path == ["d.jsonl"]


@pytest.mark.parametrize("raw, message", [
    (base(max_seq_lenn=10), "unknown key 'max_seq_lenn' (did you mean 'max_seq_len'?)"),
    (base(train_micro_batch_size_per_gpus=1), "did you mean 'train_micro_batch_size_per_gpu'?"),
    (base(model_topo={"partz": [3, 3]}), "unknown key 'model_topo.partz' (did you mean 'parts'?)"),
    (base(max_seq_len="long"), "'max_seq_len' must be int"),
    (base(use_grad_ckpt=3), "'use_grad_ckpt' must be bool | str"),
    (base(train_micro_batch_size_per_gpu=0), "'train_micro_batch_size_per_gpu' must be a positive integer"),
    ({"data_path": "d", "save_path": "s"}, "missing required key 'model_path'"),
])
def test_parse_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=None) as e:
        from_dict(raw, "x.yml")
    assert str(e.value).startswith("x.yml: ") and message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over, world, message", [
    ({"model_topo": {"process_topology": {"dims": [2, 1]}, "parts": [3, 4]}}, 2, "sums to 7 but the model has 6"),
    ({"model_topo": {"process_topology": {"dims": [2, 1]}, "parts": [6]}}, 2, "has 1 stages but dims give pipe=2"),
    ({"model_topo": {"process_topology": {"dims": [2, 2]}}}, 2, "needs 4 processes but 2 were launched"),
    ({"model_topo": {"process_topology": {"axes": ["pipe", "model"]}}}, 2, "axes must be [pipe, data]"),
    ({"train_batch_size": 10}, 2, "train_batch_size 10 != train_micro_batch_size_per_gpu 2 x gradient_accumulation"),
    ({"optimizer": {"type": "Adagrad"}}, 2, "optimizer.type 'Adagrad' is not supported"),  # 'adamw': AdamW, as DeepSpeed reads it
    ({"zero_optimization": {"stage": 3}}, 2, "use train_ds_zero.py"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, 2, "bf16 and fp16 are both enabled"),
    ({"use_grad_ckpt": "yes"}, 2, "use_grad_ckpt must be true, false, full or selective"),
    ({"fp8": "e4m3"}, 2, "fp8 must be one of off, tensorwise, rowwise, rowwise_with_gw_hp, auto, got 'e4m3'"),
    ({"fp8": "tensorwise"}, 2, "fp8: tensorwise needs bf16: {enabled: true}"),
])
def test_cross_field_rules(over, world, message):
    cfg = from_dict(base(**over), "x.yml")
    with pytest.raises(ConfigError) as e:
        validate(cfg, world, 6)
    assert message in str(e.value)


@pytest.mark.parametrize("over, message", [
    ({}, "train_ds_zero.py needs zero_optimization.stage 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs zero_optimization.stage >= 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}}, "offload_optimizer.device must be none, cpu or nvme"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3}, "model_topo": {"process_topology": {"dims": [2, 1]}}}, "the ZeRO path has no pipeline"),
    ({"zero_optimization": {"stage": 3}, "fp8": "rowwise"}, "fp8: rowwise is supported on the pipeline path"),
])
def test_zero_path_rules(over, message):
    raw = base(model_topo={"process_topology": {"dims": [1, 2]}})
    raw.update(over)
    with pytest.raises(ConfigError) as e:
        validate(from_dict(raw, "x.yml"), 2, 6, pipeline=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_batch_arithmetic_derives_grad_accum():
    raw = base(train_batch_size=16)
    del raw["gradient_accumulation_steps"]
    raw["model_topo"] = {"process_topology": {"dims": [1, 2]}}
    cfg = from_dict(raw)
    validate(cfg, 2, 6)
    assert cfg.grad_accum == 4 and cfg.data_dim == 2


def test_overrides_and_resolved_round_trip(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(base(optimizer={"type": "AdamW", "params": {"lr": 1e-3}})))
    cfg = load_config(path, ["optimizer.params.lr=5e-4", "max_seq_len=64", "model_topo.parts=[2,4]"])
    assert cfg.ds["optimizer"]["params"]["lr"] == 5e-4 and cfg.max_seq_len == 64
    assert cfg.model_topo.parts == [2, 4]
    again = from_dict(to_dict(cfg))  # the resolved config saved with checkpoints reloads to the same thing
    assert to_dict(again) == to_dict(cfg)


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("model_path: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "not valid YAML" in str(e.value)


def test_fp8_needs_torchao_and_fp8_tensor_cores(monkeypatch):
    """fp8 on a machine that cannot run it is one config line, before anything is built."""
    import sys
    import types

    import torch

    from engine.training.deepspeed_setup import layer_options

    cfg = from_dict(base(fp8="tensorwise", bf16={"enabled": True}), "x.yml")
    validate(cfg, 2, 6)
    assert layer_options(from_dict(base(), "x.yml")).fp8 == "off"  # the default needs nothing
    monkeypatch.setitem(sys.modules, "torchao", None)  # not installed
    with pytest.raises(ConfigError, match=r"^x.yml: fp8: tensorwise needs torchao \(pip install torchao\)"):
        layer_options(cfg)
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))  # installed, but no such GPU
    monkeypatch.setitem(sys.modules, "torchao.float8", types.ModuleType("torchao.float8"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^x.yml: fp8: tensorwise needs a GPU with FP8 tensor cores"):
        layer_options(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100: bf16 only
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        layer_options(cfg)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert layer_options(cfg).fp8 == "tensorwise"


def test_save_path_equal_to_a_model_dir_is_refused(tiny_pp, tmp_path):
    """save_path = model_path: refused for a converted model dir (a run resumes from save_path and
    would take it for a damaged checkpoint); allowed for a save dir an earlier run wrote."""
    from engine.config import check_paths
    from tests.test_train import config

    with pytest.raises(ConfigError, match="save_path .* is model_path, a model dir"):
        check_paths(from_dict(config(tiny_pp, tiny_pp)))
    save = tmp_path / "save"
    (save / "global_step4").mkdir(parents=True)
    (save / "global_step4" / "meta.json").write_text("{}")
    (save / "latest").write_text("global_step4")
    check_paths(from_dict(config(save, save)))  # continuing one's own run: fine
