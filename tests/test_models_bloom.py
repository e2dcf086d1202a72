"""Bloom quirks: config aliases, the embedding's own LayerNorm layer, ALiBi through the eager and
flex attention paths (logits vs transformers' BloomForCausalLM, packing). The checks every
family gets (pp=2 step with the tied head across stages, conversion) are in tests/test_families.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models import get_family
from models.attention import AttnOptions
from models.block_base import LayerOptions
from models.pipeline import SequentialModel, make_loss
from tests.model_check import shifted_labels

FAMILY = "bloom"
ATOL = 1e-5


def hf_state(hf_dir) -> dict[str, torch.Tensor]:
    """The HF checkpoint in our layout ("<layer>.<param>"), read by HF key from disk."""
    fam = get_family(FAMILY)
    disk = load_file(hf_dir / "model.safetensors")
    args = fam.Args.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    return {f"{i}.{ours}": disk[theirs] for i, names in enumerate(fam.hf_keys(args)) for ours, theirs in names.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny BloomForCausalLM with every parameter random (biases, norms), saved with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.tiny import make_tiny_tokenizer

    cfg = get_family(FAMILY).tiny_hf_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("bloom_hf")
    model.save_pretrained(out)
    make_tiny_tokenizer(out, ["a tiny model that knows nothing yet"] * 4)
    return out


def load_hf(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def ours(hf_dir, opts=LayerOptions()):
    fam = get_family(FAMILY)
    args = fam.Args.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    model = SequentialModel(fam, args, opts).eval()
    model.load_state_dict(hf_state(hf_dir))
    return model, make_loss(fam, args)


def batch(seed=1, b=2, s=16):
    ids = torch.randint(0, 320, (b, s), generator=torch.Generator().manual_seed(seed))
    labels = shifted_labels(ids)
    return ids, labels, torch.tensor(1.0) / (labels != -100).sum()


def test_tiny_config_and_aliases():
    fam = get_family(FAMILY)
    args = fam.Args.from_hf_config(fam.tiny_hf_config())
    assert (args.num_layers, args.num_heads, args.hidden_size, args.tie_word_embeddings) == (4, 6, 48, True)
    # old hub configs say n_embed / num_attention_heads
    old = fam.Args.from_hf_config({"vocab_size": 8, "n_embed": 16, "n_layer": 2, "num_attention_heads": 4})
    assert (old.hidden_size, old.num_heads, old.num_layers) == (16, 4, 2)
    groups = fam.layers(args)
    assert len(groups) == args.num_layers + 2 and [len(g) for g in (groups[0], groups[-1])] == [2, 2]
    keys = fam.hf_keys(args)
    assert keys[-1] == keys[0] == {"word_embeddings.weight": "transformer.word_embeddings.weight"}
    assert not any("lm_head" in k for names in keys for k in names.values())  # bloom checkpoints have none


@pytest.mark.parametrize("impl", ["eager"])  # sdpa: tests/test_families.py
def test_matches_transformers(hf_dir, impl):
    ids, labels, scale = batch()
    model, loss_fn = ours(hf_dir, LayerOptions(attn=AttnOptions(impl=impl)))
    with torch.no_grad():
        ref = load_hf(hf_dir)(ids, labels=ids)
        logits = model(ids)
        loss = loss_fn(logits, (labels, scale))
    assert ref.logits.abs().max() > 1  # random enough that a wrong layout could not pass
    assert (logits - ref.logits).abs().max() < ATOL
    assert abs(float(loss) - float(ref.loss)) < ATOL


@pytest.mark.parametrize("impl", ["eager", "flex"])  # sdpa: tests/test_families.py
def test_packed_row_equals_documents(hf_dir, impl):
    """Two documents packed in one row (positions restart) give each document's own logits:
    no attention across them, ALiBi distances within each."""
    ids, _, _ = batch(seed=2, b=1, s=16)
    cut = 7
    pos = torch.cat([torch.arange(cut), torch.arange(16 - cut)])[None]
    packed, _ = ours(hf_dir, LayerOptions(attn=AttnOptions(packed=True, impl=impl)))
    single, _ = ours(hf_dir, LayerOptions(attn=AttnOptions(impl=impl)))
    with torch.no_grad():
        row = packed(ids, pos)
        docs = torch.cat([single(ids[:, :cut]), single(ids[:, cut:])], dim=1)
        unmasked = single(ids, pos)  # same positions but attending across the boundary
    assert (row - docs).abs().max() < ATOL
    assert (unmasked[:, cut:] - docs[:, cut:]).abs().max() > 1e-3
