"""Checkpoints on 2 gloo ranks: reshape across layouts, non-finite steps, wall-clock saves,
rotation and the publish protocol (the kill -9 / signal / multi-node tests run the real CLI:
tests/test_kill_resume.py)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist import run_ranks
from tests.test_train import _train, config, run  # the shared 2-rank training helpers


LAYOUTS = {"pp2": dict(dims=(2, 1), parts=(3, 3)), "pp2-parts24": dict(dims=(2, 1), parts=(2, 4)),
           "dp2": dict(dims=(1, 2), parts=(6,), gradient_accumulation_steps=1)}


@pytest.mark.parametrize("zero", [{}, {"zero_optimization": {"stage": 1}},
                                  {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}],
                         ids=["fp32", "zero1", "bf16-zero1"])
def test_reshape_continues_like_the_original_layout(tiny_pp, tmp_path, zero):
    """Save on pp=2 x dp=1, continue on dp=2 and on other parts: the same losses as continuing on
    pp=2 (fp32 tolerance: reductions are ordered differently), optimizer state included."""
    run(config(tiny_pp, tmp_path / "base", steps=3, **LAYOUTS["pp2"], **zero))
    assert (tmp_path / "base" / "global_step3" / "optim" / "common.pt").is_file()
    losses = {}
    for name, layout in LAYOUTS.items():
        shutil.copytree(tmp_path / "base", tmp_path / name)
        losses[name] = run(config(tiny_pp, tmp_path / name, steps=6, **{**layout, **zero}))
        assert sorted(losses[name]) == [4, 5, 6], name  # resumed, not restarted
    for name in ("pp2-parts24", "dp2"):
        for s in (4, 5, 6):
            assert losses[name][s] == pytest.approx(losses["pp2"][s], rel=2e-5, abs=2e-5), (name, s, losses)
    # without the optimizer state the continuation would differ visibly (Adam restarts its moments)
    shutil.copytree(tmp_path / "base", tmp_path / "fresh-optim")
    shutil.rmtree(tmp_path / "fresh-optim" / "global_step3" / "optim")
    meta = tmp_path / "fresh-optim" / "global_step3" / "meta.json"
    m = json.loads(meta.read_text())
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("optim/")}
    meta.write_text(json.dumps(m))
    with pytest.raises(AssertionError, match="no topology-free optimizer state"):
        run(config(tiny_pp, tmp_path / "fresh-optim", steps=6, **{**LAYOUTS["dp2"], **zero}))


def _params(tag_dir: Path) -> dict:
    out = {}
    for f in sorted(tag_dir.glob("layer_*-model_states.pt")):
        out.update({f"{f.name}:{k}": v for k, v in torch.load(f, weights_only=True).items()})
    return out


def test_nonfinite_step_is_skipped_without_touching_weights(tiny_pp, tmp_path, monkeypatch):
    monkeypatch.setenv("PPLLM_TEST_NAN_AT_STEP", "3")  # spawned ranks inherit it
    losses, other = run_ranks(_train, 2, config(tiny_pp, tmp_path / "run", steps=4, save_every_steps=1,
                                                on_nonfinite_loss="skip"))
    assert str(losses) == str(other)  # NaN != NaN
    assert losses[3] != losses[3] and all(losses[s] == losses[s] for s in (1, 2, 4))  # NaN only at 3
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False]
    before, after = _params(tmp_path / "run" / "global_step2"), _params(tmp_path / "run" / "global_step3")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fourth = _params(tmp_path / "run" / "global_step4")
    assert any(not torch.equal(after[k], fourth[k]) for k in after)  # training went on


def test_nonfinite_stop_keeps_the_last_checkpoint(tiny_pp, tmp_path, monkeypatch):
    monkeypatch.setenv("PPLLM_TEST_NAN_AT_STEP", "3")
    with pytest.raises(AssertionError, match="step 3: loss is nan; its update was not applied"):
        run(config(tiny_pp, tmp_path / "run", steps=4, save_every_steps=2))
    assert (tmp_path / "run" / "latest").read_text() == "global_step2"
    assert not list((tmp_path / "run").glob("*global_step3*")) and not list((tmp_path / "run").glob("*global_step4*"))


def test_time_based_saves_and_rotation(tiny_pp, tmp_path):
    run(config(tiny_pp, tmp_path / "run", steps=5, save_every_minutes=1e-9, keep_last=2))
    root = tmp_path / "run"
    assert (root / "latest").read_text() == "global_step5"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("global_step")) == ["global_step4",
                                                                                         "global_step5"]
    meta = json.loads((root / "global_step5" / "meta.json").read_text())
    assert meta["layout"] == {"pp": 2, "dp": 1, "parts": [3, 3], "zero_stage": 0, "dtype": "fp32"}
    assert "layer_00-model_states.pt" in meta["files"] and "optim/common.pt" in meta["files"]


def test_rotation_never_deletes_latest(tmp_path):
    from engine.checkpoints.tags import rotate

    for s in (2, 4, 6, 8):
        (tmp_path / f"global_step{s}").mkdir()
    (tmp_path / "latest").write_text("global_step4")  # e.g. the user rolled back by hand
    rotate(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4", "global_step6", "global_step8", "latest"]


def test_damaged_checkpoint_is_refused_by_name(tiny_pp, tmp_path):
    run(config(tiny_pp, tmp_path / "run", steps=2))
    victim = tmp_path / "run" / "global_step2" / "layer_03-model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(AssertionError, match=r"layer_03-model_states.pt: 100 bytes, the checkpoint recorded"):
        run(config(tiny_pp, tmp_path / "run", steps=4))


def test_metrics_truncated_to_the_resumed_step(tmp_path):
    from engine.training.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(path, 3)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]


def _continue_from_universal(model_path, save, tag, raw):
    """DeepSpeed's own route: load a ds_to_universal checkpoint with load_universal on dp=2 and
    run steps 4-6 (the reference our reshape is checked against)."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from engine import distributed as D
    from engine.config import from_dict, validate
    from engine.training.optim import build_optimizer
    from engine.model import Model
    from engine.training.loop import build_data
    from engine.training.deepspeed_setup import deepspeed_config, layer_options
    from models.pipeline import build_pipeline

    cfg = from_dict(raw)
    model = Model.from_dir(model_path)
    D.init_distributed()
    validate(cfg, D.world_size(), model.n_layers)
    topo = ProcessTopology(axes=["pipe", "data"], dims=[1, 2])
    module = build_pipeline(model.family, model.args, layer_options(cfg), topo, [6], cfg.seed)
    engine, *_ = deepspeed.initialize(model=module, optimizer=build_optimizer(cfg.ds["optimizer"], module.parameters()),
                                      config={**deepspeed_config(cfg), "checkpoint": {"load_universal": True}})
    engine.load_checkpoint(str(save), tag=tag)
    _, loader = build_data(cfg, model, topo.get_coord(D.rank()).data, 2)
    losses = {}
    for step in range(3, 6):
        torch.manual_seed(cfg.seed + step)
        losses[step + 1] = float(engine.train_batch(iter(loader.micro_batches(step))))
    return losses


def test_reshape_agrees_with_deepspeed_universal_checkpoint(tiny_pp, tmp_path):
    """For ZeRO-1 DeepSpeed's universal checkpoint (ds_to_universal + load_universal) also works
    under PP; it is an offline conversion of DeepSpeed's own files (which our tags no longer hold)
    and does not cover the plain fp32 stage-0 path. Check that our tag and DeepSpeed's files of
    the same run (written by DeepSpeed's own save) continue identically on pp=1 x dp=2."""
    import subprocess
    import sys

    from tests.test_checkpoint_faults import _train_writing_deepspeed_files

    zero = {"zero_optimization": {"stage": 1}}
    run(config(tiny_pp, tmp_path / "ours", steps=3, **LAYOUTS["pp2"], **zero))
    ours = run(config(tiny_pp, tmp_path / "ours", steps=6, **LAYOUTS["dp2"], **zero))
    run_ranks(_train_writing_deepspeed_files, 2, config(tiny_pp, tmp_path / "base", steps=3, **LAYOUTS["pp2"], **zero))
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(tmp_path / "base" / "global_step3"), "--output_folder",
                    str(tmp_path / "base" / "global_step3_universal"), "--inject_missing_state",
                    "--num_extract_workers", "1", "--num_merge_workers", "1"], check=True, capture_output=True)
    raw = config(tiny_pp, tmp_path / "base", steps=6, **LAYOUTS["dp2"], **zero)
    theirs, _ = run_ranks(_continue_from_universal, 2, tiny_pp, tmp_path / "base", "global_step3_universal", raw)
    assert sorted(ours) == [4, 5, 6]
    for s in (4, 5, 6):
        assert ours[s] == pytest.approx(theirs[s], rel=2e-5, abs=2e-5), (ours, theirs)


@pytest.fixture(scope="module")
def mixtral_pp(tmp_path_factory):
    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model, sample_texts
    from tests.conftest import EXAMPLE_DATA

    root = tmp_path_factory.mktemp("mixtral")
    make_tiny_hf_model(root / "hf", "mixtral", sample_texts(EXAMPLE_DATA))
    return hf_to_pp(root / "hf", root / "pp")


def unstack_experts(tag: Path, keys: list[dict]) -> None:
    """Rewrite a tag's layer files and optimizer state as written before the experts were stored
    stacked (per-expert `block_sparse_moe.experts.{e}.w1.weight`, ... names), sizes and hashes
    recorded in meta.json as the old version wrote them."""
    from engine.checkpoints import integrity
    from engine.checkpoints.files import layer_file
    from models.keymap import Fused

    meta = json.loads((tag / "meta.json").read_text())
    for idx, names in enumerate(keys):
        weights = torch.load(layer_file(tag, idx), weights_only=True)
        stacked = {ours: f for ours, f in names.items() if isinstance(f, Fused) and f.stack}
        if not stacked:
            continue
        optim = tag / "optim" / f"layer_{idx:02d}.pt"
        moments = torch.load(optim, weights_only=True)
        for ours, f in stacked.items():
            shape = weights[ours].shape
            weights.update(zip(f.old, (t.clone() for t in f.split(weights.pop(ours)))))
            state = moments.pop(ours)
            for old, *parts in zip(f.old, *(f.split(v.reshape(shape)) for v in state.values())):
                moments[old] = {k: t.clone() for k, t in zip(state, parts)}
        for path, obj in ((layer_file(tag, idx), weights), (optim, moments)):
            torch.save(obj, path)
            rel = str(path.relative_to(tag))
            meta["files"][rel] = path.stat().st_size
            meta["hashes"][rel] = integrity.hash_file(path, meta["hash"])
    (tag / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("zero", [{}, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}],
                         ids=["fp32", "bf16-zero1"])
def test_mixtral_old_per_expert_layout_loads_and_resumes(mixtral_pp, tmp_path, zero):
    """A mixtral tag written before the experts were stored stacked (per-expert w1/w2/w3 in its
    layer and optimizer files) loads (open_weights, a layer's strict load_state_dict) and resumes
    exactly as the same tag in today's layout: weights, fp32 masters and Adam moments by name."""
    from engine.checkpoints.files import layer_file
    from engine.checkpoints.weights import open_weights
    from engine.model import Model
    from models.pipeline import SequentialModel

    run(config(mixtral_pp, tmp_path / "base", steps=3, **LAYOUTS["pp2"], **zero))
    model = Model.from_dir(mixtral_pp)
    keys = model.family.hf_keys(model.args)
    for name in ("new", "old"):
        shutil.copytree(tmp_path / "base", tmp_path / name)
    tag = tmp_path / "old" / "global_step3"
    unstack_experts(tag, keys)
    old = torch.load(layer_file(tag, 1), weights_only=True)
    assert "block_sparse_moe.experts.3.w2.weight" in old and "block_sparse_moe.experts.down_proj" not in old

    new_source, old_source = open_weights(tmp_path / "new"), open_weights(tmp_path / "old")
    seq = SequentialModel(model.family, model.args)
    for idx, layer in seq.owned_layers():
        want = new_source.layer(idx)
        assert want.keys() == old_source.layer(idx).keys()
        assert all(torch.equal(old_source.layer(idx)[k], v) for k, v in want.items())
        layer.load_state_dict(torch.load(layer_file(tag, idx), weights_only=True))  # strict: stacked by the hook
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in want.items())

    losses = {name: run(config(mixtral_pp, tmp_path / name, steps=5, **LAYOUTS["pp2"], **zero))
              for name in ("new", "old")}
    assert sorted(losses["old"]) == [4, 5]  # resumed, not restarted
    assert losses["old"] == losses["new"]
