"""bench/bench_train.py FAMILY_SHAPES (issue 25): each family's stage-sized bench model is a real
config its family reads, about llama-7B's 16-block stage in parameters, fits one H200 with bf16
weights + fp32 masters + Adam + fp32 gradient accumulation, and its MFU counts only the experts
a token runs. Built on the meta device: nothing is allocated."""
import pytest
import torch

from bench.bench_train import FAMILY_SHAPES, family_config
from engine.training.metrics import flops_per_token
from models import family_for_hf_config
from models.pipeline import SequentialModel

EXPECTED = {"llama-7b": "llama", "bloom-7b1": "bloom", "baichuan2-7b": "baichuan", "baichuan2-13b": "baichuan",
            "chatglm3-6b": "chatglm", "mixtral-8x7b": "mixtral"}
H200_BYTES = 141e9
BYTES_PER_PARAM = 18  # bf16 weight + bf16 grad + fp32 master + Adam m, v + fp32 grad accumulation - bf16 grad freed


def stage(name):
    cfg = family_config(name)
    fam = family_for_hf_config(cfg)
    args = fam.Args.from_hf_config(cfg)
    with torch.device("meta"):
        model = SequentialModel(fam, args)
    return fam, args, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_family_shape_is_a_stage_that_fits_one_h200(name):
    fam, args, n = stage(name)
    assert fam.__name__ == f"models.{EXPECTED[name]}"
    d = fam.dims(args)
    assert d.hidden >= 4096 and d.head_dim == 128
    assert n * BYTES_PER_PARAM < 0.75 * H200_BYTES  # a quarter left for activations and workspace
    if d.experts:
        assert flops_per_token(d, n, 2048) < 0.5 * 6 * n  # top 2 of 8 experts run
    else:
        assert 3.3e9 < n < 3.6e9  # llama-7B's 16-block stage is 3.50B
    assert name != "baichuan2-13b" or d.positional == "alibi"
    assert name != "bloom-7b1" or (d.positional == "alibi" and d.tied)


def test_llama_presets_keep_their_shapes():
    assert family_config("llama-7b")["num_hidden_layers"] == 16  # the stage, as the other families'
    assert family_config("llama-7b", "7b")["num_hidden_layers"] == 32  # --shape presets: the whole model, as before
    assert family_config("llama-7b", "13b")["num_hidden_layers"] == 40
    assert family_config("llama-7b", "tiny", layers=3)["num_hidden_layers"] == 3
    assert family_config("mixtral-8x7b", layers=4)["num_hidden_layers"] == 4
