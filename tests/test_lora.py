"""LoRA (models/lora.py, engine/checkpoints/lora.py): every family's adapters export as a PEFT
adapter that peft itself loads with our logits, merged exports equal peft's merge; training
under pp=2 changes only the adapters, saves only them, resumes on another layout; ZeRO-2 and ZeRO-3
(same losses, adapter-only tags, resume); config errors."""
import json
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, from_dict, validate
from models import family_names, get_family
from models.lora import LoraSpec, add_lora, merge
from models.pipeline import SequentialModel
from tests.test_families import hf_dir, load_reference, logits_of, ours  # noqa: F401 (hf_dir: fixture)
from tests.test_train import config, run

ATOL = 1e-5


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


LORA = {"r": 4, "alpha": 32.0, "target_modules": "all-linear"}
BF16 = {"bf16": {"enabled": True}}


def _train_keeping_engine(raw, zero=False):
    """train / train_zero on this rank; returns its losses and what the engine holds after training:
    {layer: {param: tensor}} of the frozen parameters, trainable count, fp32 master elements."""
    import deepspeed

    from engine.training import backends, loop

    kept = {}
    cls = backends.ZeroBackend if zero else backends.PipelineBackend
    build = cls.build

    def keep(self, *a):
        kept["engine"] = build(self, *a)
        return kept["engine"]

    cls.build = keep
    result = (loop.train_zero if zero else loop.train)(from_dict(raw))
    engine = kept["engine"]
    module = engine.module
    layers = [(module._local_start + i, f) for i, f in enumerate(module.forward_funcs) if isinstance(f, torch.nn.Module)] \
        if hasattr(module, "forward_funcs") else module.owned_layers()
    frozen = {}
    for idx, layer in layers:  # ZeRO-3: each layer's partitions gathered in turn (every rank, same order)
        with deepspeed.zero.GatheredParameters(list(layer.parameters())):
            frozen[idx] = {n: p.detach().float().clone() for n, p in layer.named_parameters() if not p.requires_grad}
    numel = (lambda p: getattr(p, "ds_numel", p.numel()))  # noqa: E731  ZeRO-3: the full size, not the partition
    trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
    opt = engine.optimizer
    groups = next((getattr(opt, a) for a in ("bf16_groups", "bit16_groups", "fp16_groups") if hasattr(opt, a)), [])
    masters = sum(numel(p) for g in groups for p in g)
    grads = [n for n, p in module.named_parameters() if not p.requires_grad and p.grad is not None]
    dtypes = {str(p.dtype) for p in module.parameters() if not p.requires_grad}
    return result.losses, frozen, trainable, masters, grads, dtypes


def run_keeping(raw, zero=False):
    from tests.dist import run_ranks

    out = run_ranks(_train_keeping_engine, 2, raw, zero)
    assert out[0][0] == out[1][0]
    return out


def _adapted_numel(path, spec):
    model, _, m = ours(path)
    add_lora(model.owned_layers(), m.family, m.args, spec, seed=0)
    return model.owned_layers()


def _base_layers(model_path) -> dict[int, dict[str, torch.Tensor]]:
    from engine.checkpoints.weights import open_weights

    src = open_weights(model_path)
    return {idx: src.layer(idx) for idx in range(len(src))}


def lora_config(tiny_pp, save, **over):
    raw = config(tiny_pp, save, steps=12, lora=LORA, **BF16, **over)
    raw["optimizer"]["params"]["lr"] = 3e-2
    return raw


@pytest.fixture(scope="module")
def lora_run(tiny_pp, tmp_path_factory):
    """One pp=2 bf16 LoRA run of 12 steps: (save_path, each rank's _train_keeping_engine result)."""
    save = tmp_path_factory.mktemp("lora_run") / "run"
    return save, run_keeping(lora_config(tiny_pp, save))


def test_pp2_trains_only_the_adapters_saves_them_alone_exports_and_resumes_on_dp2(tiny_pp, lora_run, tmp_path, capsys):
    from convert_model import main as convert
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tests.conftest import run_main

    save, ranks = lora_run
    losses = ranks[0][0]
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 0.15, losses
    base = _base_layers(tiny_pp)
    for _, frozen, trainable, masters, grads, dtypes in ranks:
        assert frozen and trainable and dtypes == {"torch.bfloat16"} and not grads
        assert masters == trainable  # an fp32 master (and optimizer state) only for the adapters
        for idx, params in frozen.items():  # the base is bitwise what model_path holds, in bf16
            for n, t in params.items():
                assert torch.equal(t, base[idx][n].to(torch.bfloat16).float()), (idx, n)

    tag = save / "global_step12"
    meta = json.loads((tag / "meta.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["base"] == str(Path(tiny_pp).absolute())
    assert meta["n_params"] == ranks[0][2] + ranks[1][2]
    for f in tag.glob("layer_*-model_states.pt"):  # only adapters: 4 blocks, none for embedding or head
        assert all(".lora_" in k for k in torch.load(f, weights_only=True)), f
    assert len(list(tag.glob("layer_*-model_states.pt"))) == 4
    size = sum(meta["files"].values())
    assert size / meta["n_params"] < 16  # fp32 adapters + 2 Adam moments (+ file framing)

    # exports: a PEFT adapter that peft loads on the base, and the merged model, agree in fp32
    code, _, err = run_main(convert, ["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "x")], capsys)
    assert code == 2 and "LoRA checkpoint" in err and "--lora-adapter" in err and len(err.strip().splitlines()) == 1
    assert run_main(convert, ["pp_to_hg", "--input-path", str(save), "--lora-adapter", str(tmp_path / "adapter")],
                    capsys)[0] == 0
    assert run_main(convert, ["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "merged"),
                              "--merge-lora"], capsys)[0] == 0
    from engine.training.export import export_hf  # --export-hf at the end of a LoRA run: the merged model
    from safetensors.torch import load_file
    export_hf(save, tmp_path / "exported", log=lambda _: None)
    assert [load_file(f) for f in sorted((tmp_path / "exported").glob("*.safetensors"))][0].keys() == \
        [load_file(f) for f in sorted((tmp_path / "merged").glob("*.safetensors"))][0].keys()
    hf = Path(tiny_pp).parent / "hf"
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
                                         tmp_path / "adapter").eval()(input_ids=ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        merged = merged_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (peft - plain).abs().max() > 1e-3
    # the merged export is in the source dtype (rounded there): equal to peft's within that rounding
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == \
        json.loads((hf / "config.json").read_text()).get("dtype", "float32")
    torch.testing.assert_close(merged, peft, atol=1e-5, rtol=0)
    from engine.inference.generate import load_ours  # demo.py on the run's dir: base + adapters, not merged
    with torch.no_grad():
        demo = load_ours(save, devices=["cpu"], dtype="float32").model(ids)
    torch.testing.assert_close(demo, peft, atol=1e-5, rtol=0)

    # the same tag resumes on another layout (dp=2): adapters and their optimizer state reshaped
    more = lora_config(tiny_pp, save, dims=(1, 2), parts=(6,))
    more["max_steps"] = 14
    resumed = run(more)
    assert sorted(resumed) == [13, 14] and all(v < losses[1] for v in resumed.values())


def _cfg(**lora):
    raw = {"model_path": "m", "data_path": "d.jsonl", "save_path": "s", "lora": lora,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    return raw


@pytest.mark.parametrize("lora, message", [
    ({"r": -1}, "lora.r must be >= 0"),
    ({"r": "8"}, "'lora.r' must be int"),
    ({"r": 8, "alpha": 0}, "lora.alpha must be a finite number > 0"),
    ({"r": 8, "dropout": 1.0}, "lora.dropout must be in [0, 1)"),
    ({"r": 8, "target_modules": "all_linear"}, "lora.target_modules must be a list of module names, all-linear or a regex, "
                                               "got 'all_linear' (did you mean 'all-linear'?)"),
    ({"r": 8, "target_modules": []}, "lora.target_modules must name at least one module"),
    ({"r": 8, "rank": 8}, "unknown key 'lora.rank'"),
])
def test_bad_lora_values_are_one_line_errors(lora, message):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(_cfg(**lora), "x.yml"), 2, 6)
    assert str(e.value).startswith("x.yml: ") and message in str(e.value) and "\n" not in str(e.value)


def test_cli_set_help_config_and_names_the_model_lacks(tiny_pp, capsys):
    from engine.config import apply_overrides, help_text
    from engine.model import Model
    from engine.training.backends import lora_spec

    assert all(f"lora.{k}:" in help_text() for k in ("r", "alpha", "dropout", "target_modules", "modules_to_save"))
    raw = apply_overrides(_cfg(), ["lora.r=16", "lora.target_modules=all-linear", "lora.modules_to_save=[lm_head]"])
    cfg = from_dict(raw, "x.yml")
    assert (cfg.lora.r, cfg.lora.target_modules, cfg.lora.modules_to_save) == (16, "all-linear", ["lm_head"])
    model = Model.from_dir(tiny_pp)
    assert lora_spec(cfg, model).scaling == 1.0
    for over, message in ((["lora.target_modules=[q_proj, qkv_proj]"], "lora.target_modules: 'qkv_proj' is no "
                           "adaptable linear of this llama model (its blocks' linears: q_proj, k_proj, v_proj, o_proj, "
                           "gate_proj, up_proj, down_proj; or all-linear)"),
                          (["lora.modules_to_save=[head]"], "lora.modules_to_save: 'head' matches no whole module")):
        with pytest.raises(ConfigError) as e:
            lora_spec(from_dict(apply_overrides(_cfg(r=8), over), "x.yml"), model)
        assert str(e.value).startswith(f"x.yml: {message}"), str(e.value)
    # the dry run counts what the run trains (7B all-linear r16: PEFT's 39,976,960), stages hold no grads for the base
    from engine.plan import layer_costs, Setup, estimate, static_bytes_per_param
    spec = lora_spec(cfg, model)
    lora_costs = layer_costs(model.family, model.args, Setup(lora=spec, gpu=False))
    assert sum(c.trainable for c in lora_costs) == sum(p.numel() for _, layer in _adapted_numel(tiny_pp, spec)
                                                       for p in layer.parameters() if p.requires_grad)
    full, lora = (estimate(layer_costs(model.family, model.args, Setup(lora=x, gpu=False)), [3, 3], Setup(lora=x, gpu=False))
                  for x in (None, LoraSpec(r=2)))
    assert all(l.grads < f.grads / 5 and l.optimizer < f.optimizer / 5 for f, l in zip(full, lora))
    # the frozen base's weights as in full fine-tuning, plus the adapters' own (no base weights)
    per = static_bytes_per_param(Setup(lora=LoraSpec(r=2), gpu=False))["weights"]
    assert all(l.weights == pytest.approx(f.weights + per * l.extra["trainable"]) for f, l in zip(full, lora))
    mixtral = get_family("mixtral")
    from models.lora import block_targets
    assert {t.rsplit(".", 1)[-1] for t in block_targets(mixtral, mixtral.Args.from_hf_config(mixtral.tiny_hf_config()))} \
        == {"q_proj", "k_proj", "v_proj", "o_proj"}  # as PEFT's all-linear on transformers' Mixtral


def zero_lora_config(tiny_pp, save, stage, steps=6):
    """fp32, as tests/test_zero.py compares the stages: bf16 rounds ZeRO-2's and ZeRO-3's
    differently ordered gradient sums apart."""
    raw = config(tiny_pp, save, dims=(1, 2), parts=None, steps=steps, lora=LORA, zero_optimization={"stage": stage})
    raw["optimizer"]["params"]["lr"] = 3e-2
    return raw


@pytest.fixture(scope="module")
def zero2_lora(tiny_pp, tmp_path_factory):
    """One ZeRO-2 fp32 LoRA run of 6 steps on 2 ranks: (save_path, each rank's _train_keeping_engine result)."""
    save = tmp_path_factory.mktemp("zero2_lora") / "z"
    return save, run_keeping(zero_lora_config(tiny_pp, save, 2), zero=True)


def _check_adapters_only(tiny_pp, ranks, tag):
    base = _base_layers(tiny_pp)
    for _, frozen, trainable, masters, grads, dtypes in ranks:
        assert trainable and masters == trainable and not grads and dtypes == {"torch.float32"}
        assert sorted(frozen) == sorted(base) and all(frozen.values())
        for idx, params in frozen.items():  # the base is bitwise what model_path holds
            for n, t in params.items():
                assert torch.equal(t, base[idx][n].float()), (idx, n)
    meta = json.loads((tag / "meta.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["layout"]["engine"] == "zero" and meta["n_params"] == ranks[0][2]
    files = list(tag.glob("layer_*-model_states.pt"))
    assert len(files) == 4 and all(".lora_" in k for f in files for k in torch.load(f, weights_only=True))
    return meta


def test_zero2_trains_only_the_adapters(tiny_pp, zero2_lora):
    save, ranks = zero2_lora
    _check_adapters_only(tiny_pp, ranks, save / "global_step6")


def _zero3_then_resume(first, second):
    """This rank's _train_keeping_engine result of `first`, then the losses of `second` resuming a copy
    of its save_path (this process holds the first one's run lock until it exits)."""
    import shutil

    import torch.distributed as dist

    from engine.config import from_dict
    from engine.training.loop import train_zero

    kept = _train_keeping_engine(first, zero=True)
    if dist.get_rank() == 0:
        shutil.copytree(first["save_path"], second["save_path"], ignore=shutil.ignore_patterns(".lock"))
    dist.barrier()
    return kept, train_zero(from_dict(second)).losses


def test_zero3_trains_only_the_adapters_like_zero2_and_resumes(tiny_pp, zero2_lora, tmp_path):
    """Adapters made before the engine partitions them: ZeRO-3 parameters like the base, which
    stays frozen (no fp32 master, grad or state). The same losses as ZeRO-2, adapter-only tags
    gathered a parameter at a time, and a resume from step 3 continues the run."""
    from tests.dist import run_ranks

    save = tmp_path / "z3"
    out = run_ranks(_zero3_then_resume, 2, zero_lora_config(tiny_pp, save, 3, steps=3),
                    zero_lora_config(tiny_pp, tmp_path / "resumed", 3, steps=6))
    ranks, resumed = [kept for kept, _ in out], out[0][1]
    assert ranks[0][0] == ranks[1][0] and resumed == out[1][1]
    meta = _check_adapters_only(tiny_pp, ranks, save / "global_step3")
    z2_tag = zero2_lora[0] / "global_step6"
    assert meta["n_params"] == json.loads((z2_tag / "meta.json").read_text())["n_params"]
    assert sorted(f.relative_to(save / "global_step3") for f in (save / "global_step3").rglob("*.pt")) == \
        sorted(f.relative_to(z2_tag) for f in z2_tag.rglob("*.pt"))  # the same adapter-only files, optim/ included
    assert sorted(resumed) == [4, 5, 6]  # resumed, did not restart
    losses, ref = {**ranks[0][0], **resumed}, zero2_lora[1][0][0]
    for s in range(1, 7):
        assert losses[s] == pytest.approx(ref[s], rel=1e-5), (losses, ref)
    # the loss falls: step 1's batches (per-step losses differ more by batch than by 6 steps of
    # training) score lower on the base with the trained adapters merged in than on the base
    from engine.checkpoints.convert import pp_to_hg
    from tests.test_zero import _first_step_loss
    merged = pp_to_hg(tmp_path / "resumed", tmp_path / "merged", dtype="float32", merge_lora=True)
    raw = zero_lora_config(tiny_pp, save, 3)
    trained, start = _first_step_loss(merged, raw, 2), _first_step_loss(tiny_pp, raw, 2)
    assert start == pytest.approx(losses[1], rel=1e-5) and trained < start - 0.02, (trained, start)


def test_kill9_then_same_command_resumes_bitwise(tiny_pp, lora_run, tmp_path):
    """The real launcher, killed -9 after a checkpoint; the same command again gives the
    uninterrupted run's losses (lora_run's, same config) bitwise."""
    import yaml

    from tests.test_kill_resume import kill9, launch, losses, steps_logged, wait_for, wait_group

    save, log, cfg = tmp_path / "run", tmp_path / "log", tmp_path / "run.yml"
    cfg.write_text(yaml.safe_dump(lora_config(tiny_pp, save, save_every_steps=2, keep_last=2)))
    proc = launch(cfg, log)
    wait_for(lambda: (save / "latest").exists() and max(steps_logged(save), default=0) >= 5, proc, "a checkpoint")
    kill9(proc)
    assert (save / "latest").read_text() in {f"global_step{s}" for s in (2, 4, 6, 8, 10)}
    proc = launch(cfg, log)
    assert wait_group(proc) == 0, log.read_text()[-3000:]
    assert "resumed at step" in log.read_text() and "B/trainable param" in log.read_text()  # checkpoint size
    assert dict(losses(save)) == lora_run[1][0][0]  # every step, bitwise


def test_exports_load_in_autopeft_and_the_run_goes_on_as_model_path_or_init_from(tiny_pp, lora_run, tmp_path, capsys):
    """--lora-adapter names the HF dir the run trained from (hf_to_pp's source.json), so
    AutoPeftModelForCausalLM loads it alone; the run dir as a new run's model_path is its base with
    the adapters merged (= the --merge-lora export), and lora.init_from starts from the adapters:
    step 1 of an init_from run equals step 1 of a fresh LoRA on the run dir within 1e-5 (fp32, pp=2)."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    from convert_model import main as convert
    from engine.checkpoints.convert import pp_to_hg
    from engine.checkpoints.weights import open_weights
    from tests.conftest import run_main

    save, hf = lora_run[0], Path(tiny_pp).parent / "hf"
    assert run_main(convert, ["pp_to_hg", "--input-path", str(save), "--lora-adapter", str(tmp_path / "adapter")],
                    capsys)[0] == 0
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(hf.absolute())
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
        peft = PeftModel.from_pretrained(load_reference(hf), tmp_path / "adapter").eval()
        torch.testing.assert_close(auto(input_ids=ids).logits, peft(input_ids=ids).logits, atol=ATOL, rtol=0)

    merged = pp_to_hg(save, tmp_path / "merged", dtype="float32", merge_lora=True)
    as_model, exported, base = open_weights(save), open_weights(merged), open_weights(tiny_pp)
    for idx in range(len(as_model)):
        for k, t in as_model.layer(idx).items():
            torch.testing.assert_close(t.float(), exported.layer(idx)[k], atol=1e-6, rtol=0)
    assert not torch.equal(as_model.layer(1)["self_attn.qkv_proj.weight"], base.layer(1)["self_attn.qkv_proj.weight"])

    def fp32(model_path, run, **over):
        raw = config(model_path, tmp_path / run, steps=1, **{"lora": LORA, **over})
        raw["optimizer"]["params"]["lr"] = 3e-2
        return raw

    started = run(fp32(tiny_pp, "init_from", lora={**LORA, "init_from": str(tmp_path / "adapter")}))
    on_merged = run(fp32(save, "on_run"))
    assert started[1] == pytest.approx(on_merged[1], abs=1e-5), (started, on_merged)


def test_lora_metadata_is_checked_by_every_reader(tiny_pp, lora_run, tmp_path, capsys):
    """meta.json's lora entry is covered by lora_hash, and checked against the tensors (r, targets)
    and its base: a tag whose meta.json says r 8 over r 4 tensors (hash updated, as a buggy writer
    would) is one line naming the file and field in resume, demo, --lora-adapter, --merge-lora and
    model_path; an entry edited without its hash is refused by the hash."""
    import shutil

    from convert_model import main as convert
    from demo import main as demo
    from engine.checkpoints import tags
    from engine.checkpoints.files import LayoutError
    from engine.checkpoints.lora import digest
    from engine.checkpoints.weights import open_weights
    from models.tiny import make_tiny_hf_model
    from tests.conftest import run_main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello"\n')

    def copy(name, rehash=True, **lora):
        run_dir = tmp_path / name
        shutil.copytree(lora_run[0], run_dir, ignore=shutil.ignore_patterns(".lock"))
        path = run_dir / (run_dir / "latest").read_text() / "meta.json"  # (test_pp2_... resumes the run to 14)
        meta = json.loads(path.read_text())
        meta["lora"].update(lora)
        if rehash:
            meta["lora_hash"] = digest(meta["lora"], meta["hash"])
        path.write_text(json.dumps(meta))
        return run_dir

    def readers(run_dir, over):
        def resume():
            raw = lora_config(tiny_pp, run_dir)
            raw["lora"] = {**LORA, **over}  # the config that wrote the (edited) entry
            cfg = from_dict(raw)
            tags.weights_from_tag(cfg, "llama", 6)
        yield "resume", resume
        for name, argv in (("demo", (demo, ["--model", str(run_dir), "--prompts", str(prompts), "--devices", "cpu"])),
                           ("--lora-adapter", (convert, ["pp_to_hg", "--input-path", str(run_dir), "--lora-adapter",
                                                         str(run_dir / "out_adapter")])),
                           ("--merge-lora", (convert, ["pp_to_hg", "--input-path", str(run_dir), "--save-path",
                                                       str(run_dir / "out_merged"), "--merge-lora"]))):
            def cli(main=argv[0], args=argv[1]):
                code, _, err = run_main(main, args, capsys)
                assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, repr(err)
                raise LayoutError(err)
            yield name, cli
        yield "model_path", lambda: open_weights(run_dir).layer(1)

    wide = make_tiny_hf_model(tmp_path / "wide", "llama", ["a b"] * 4, hidden_size=96)
    cases = ((copy("r8", r=8), {"r": 8}, "layer_01-model_states.pt: 'self_attn.qkv_proj.lora_A.q_proj' has r 4, meta.json's "
              "lora.r is 8"),
             (copy("edited", rehash=False, r=8), {"r": 8}, "meta.json: the 'lora' entry does not match its checksum (lora_hash)"),
             (copy("targets", target_modules=["q_proj"]), {"target_modules": ["q_proj"]}, "which meta.json's lora.target_modules"),
             (copy("base", base=str(wide)), {}, f"lora.base {wide} has hidden_size 96"))
    capsys.readouterr()  # what making the cases printed
    for run_dir, over, message in cases:
        for name, read in readers(run_dir, over):
            if name == "resume" and "lora.base" in message:
                continue  # resume takes the base from model_path, not from meta.json
            with pytest.raises(LayoutError) as e:
                read()
            assert message in str(e.value) and str(run_dir) in str(e.value), (name, str(e.value))
        assert not (run_dir / "out_adapter").exists() and not (run_dir / "out_merged").exists()
