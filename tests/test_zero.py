"""ZeRO path (train_ds_zero.py) on 2 gloo ranks: the same losses as the pipeline path, exact
resume, HF export from its checkpoints, and weights handed over between the two paths."""
import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_ranks
from tests.test_train import config, run

REL = 1e-4  # fp32: the two paths sum the same gradients in a different order


def zero_config(model_path, save_path, stage, steps=6, **over) -> dict:
    zero = {"stage": stage, **over.pop("zero", {})}
    return config(model_path, save_path, dims=(1, 2), parts=None, steps=steps, zero_optimization=zero, **over)


def _train_zero(raw):
    from engine.config import from_dict
    from engine.training.loop import train_zero

    return train_zero(from_dict(raw)).losses


def run_zero(raw) -> dict[int, float]:
    losses = run_ranks(_train_zero, 2, raw)
    assert losses[0] == losses[1]  # every rank reports the data-parallel mean
    return losses[0]


@pytest.fixture(scope="module")
def pipeline_losses(tiny_pp, tmp_path_factory):
    """The reference: pipeline path, pp=1 x dp=2, fp32, same data and seed."""
    return run(config(tiny_pp, tmp_path_factory.mktemp("pipe") / "run", dims=(1, 2), parts=None))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_matches_pipeline_and_resumes_bitwise(tiny_pp, pipeline_losses, tmp_path, stage):
    first = run_zero(zero_config(tiny_pp, tmp_path / "run", stage, steps=3))
    second = run_zero(zero_config(tiny_pp, tmp_path / "run", stage, steps=6))
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]  # resumed, did not restart
    losses = {**first, **second}
    for s in range(1, 7):
        assert losses[s] == pytest.approx(pipeline_losses[s], rel=REL), (stage, losses, pipeline_losses)
    full = run_zero(zero_config(tiny_pp, tmp_path / "full", stage, steps=6))
    assert losses == full  # stop + resume replays the uninterrupted run exactly
    tag = tmp_path / "run" / "global_step6"
    assert len(list(tag.glob("layer_*-model_states.pt"))) == 6  # pipeline layout inside every ZeRO tag
    assert json.loads((tag / "meta.json").read_text())["layout"]["engine"] == "zero"


def test_zero3_export_loads_in_transformers(tiny_pp, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.checkpoints.convert import pp_to_hg
    from engine.checkpoints.files import layer_file, load_layer
    from models import llama
    from models.keymap import model_to_hf

    run_zero(zero_config(tiny_pp, tmp_path / "run", 3, steps=3))  # WarmupLR: lr 0 on steps 1-2
    out = pp_to_hg(tmp_path / "run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).state_dict()
    args = llama.Args.from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    layers = {f"{idx}.{k}": v for idx in range(len(llama.hf_keys(args)))
              if layer_file(tmp_path / "run" / "global_step3", idx).exists()
              for k, v in load_layer(layer_file(tmp_path / "run" / "global_step3", idx)).items()}
    trained = model_to_hf(llama, args, layers)
    assert set(trained) <= set(hf)
    for key, value in trained.items():
        assert torch.equal(hf[key], value), key
    start = load_layer(layer_file(Path(tiny_pp) / "global_step0", 1))["self_attn.qkv_proj.weight"]
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], start[:start.shape[1]])  # it trained


def _first_step_loss(model_dir, raw, dp: int) -> float:
    """Step 1's loss for the weights in model_dir, computed in this process (no DeepSpeed): the
    mean over dp ranks and micro-batches of the loader's scaled losses."""
    from engine.checkpoints.weights import open_weights
    from engine.config import from_dict
    from engine.model import Model
    from engine.training.loop import build_data
    from models.loss import causal_lm_loss
    from models.pipeline import SequentialModel

    cfg = from_dict(raw)
    model = Model.from_dir(model_dir)
    seq, source = SequentialModel(model.family, model.args), open_weights(model_dir, model)
    for idx, layer in seq.owned_layers():
        layer.load_state_dict(source.layer(idx))
    total = 0.0
    with torch.no_grad():
        for rank in range(dp):
            _, loader = build_data(cfg, model, rank, dp)
            total += sum(float(causal_lm_loss(seq(*inputs), labels)) for inputs, labels in loader.micro_batches(0))
    return total / (dp * cfg.grad_accum)


def test_checkpoint_resumes_on_another_zero_stage(tiny_pp, pipeline_losses, tmp_path):
    """Every stage writes the same per-layer tag (fp32 masters in the layer files, moments in
    optim/): ZeRO-1's checkpoint continues under ZeRO-3, optimizer state included."""
    run_zero(zero_config(tiny_pp, tmp_path / "run", 1, steps=3))
    assert not list((tmp_path / "run" / "global_step3").glob("*optim_states*"))  # no DeepSpeed partitions
    second = run_zero(zero_config(tiny_pp, tmp_path / "run", 3, steps=6))
    assert sorted(second) == [4, 5, 6]
    for s in (4, 5, 6):
        assert second[s] == pytest.approx(pipeline_losses[s], rel=REL), (second, pipeline_losses)


def test_weights_hand_over_between_pipeline_and_zero(tiny_pp, tmp_path):
    """Pipeline (pp=1 x dp=2) steps 1-3, then ZeRO-3 from that checkpoint's weights (fresh
    optimizer), then the pipeline at pp=2 from the ZeRO checkpoint: each run's first loss is
    that of the weights the previous run saved."""
    run(config(tiny_pp, tmp_path / "pipe", dims=(1, 2), parts=None, steps=3))
    zero_raw = zero_config(tmp_path / "pipe", tmp_path / "zero", 3, steps=2)
    zero = run_zero(zero_raw)
    assert zero[1] == pytest.approx(_first_step_loss(tmp_path / "pipe", zero_raw, 2), rel=REL)
    pipe_raw = config(tmp_path / "zero", tmp_path / "again", dims=(2, 1), parts=(3, 3), steps=1)
    again = run(pipe_raw)
    assert again[1] == pytest.approx(_first_step_loss(tmp_path / "zero", pipe_raw, 1), rel=REL)
    with pytest.raises(AssertionError, match="saved by zero training"):  # optimizer state does not cross over
        run(config(tiny_pp, tmp_path / "zero", dims=(1, 2), parts=None, steps=4))


def test_zero3_offload_and_activation_checkpointing_match_pipeline(tiny_pp, pipeline_losses, tmp_path):
    """Parameters and optimizer state offloaded to CPU, blocks recomputed in backward, a torch
    AdamW as client optimizer (zero_force_ds_cpu_optimizer: false): the same losses."""
    offload = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    losses = run_zero(zero_config(tiny_pp, tmp_path / "run", 3, zero=offload, use_grad_ckpt=True,
                                  zero_force_ds_cpu_optimizer=False, save_at_end=False))
    for s in range(1, 7):
        assert losses[s] == pytest.approx(pipeline_losses[s], rel=REL), (losses, pipeline_losses)


@pytest.mark.slow
def test_offload_uses_deepspeed_cpu_adam(tiny_pp, pipeline_losses, tmp_path):
    """THE SLOW TEST (~1 min once per machine: JIT-builds DeepSpeed's cpu_adam op, cached after).
    offload_optimizer without zero_force_ds_cpu_optimizer: false is what DeepSpeed requires its own
    CPU Adam for; engine.training.optim builds it, and it trains like torch's AdamW."""
    losses = run_zero(zero_config(tiny_pp, tmp_path / "run", 2, zero={"offload_optimizer": {"device": "cpu"}},
                                  save_at_end=False))
    for s in range(1, 7):
        assert losses[s] == pytest.approx(pipeline_losses[s], rel=1e-3), (losses, pipeline_losses)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from engine.config import from_dict
    from engine.training.optim import build_optimizer

    cfg = from_dict(zero_config(tiny_pp, tmp_path / "run", 2, zero={"offload_optimizer": {"device": "cpu"}}))
    assert isinstance(build_optimizer(cfg.ds["optimizer"], [torch.nn.Parameter(torch.ones(2))], cfg.ds), DeepSpeedCPUAdam)


def test_zero3_mixtral_gathers_every_expert(tmp_path):
    """MoE under ZeRO-3: the experts are stored stacked in one Experts module whose forward runs
    the grouped GEMMs, so DeepSpeed's module hooks gather all of them on every rank (whatever the
    routing) in its forward and backward. Same losses as the pipeline path (aux loss included)."""
    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model, sample_texts
    from tests.conftest import EXAMPLE_DATA

    make_tiny_hf_model(tmp_path / "hf", "mixtral", sample_texts(EXAMPLE_DATA))
    pp = hf_to_pp(tmp_path / "hf", tmp_path / "pp")
    ref = run(config(pp, tmp_path / "pipe", dims=(1, 2), parts=None, steps=3))
    losses = run_zero(zero_config(pp, tmp_path / "z3", 3, steps=3))
    assert sorted(losses) == [1, 2, 3]
    for s in range(1, 4):
        assert losses[s] == pytest.approx(ref[s], rel=REL), (losses, ref)
