"""Llama quirks: rope variants (linear, llama3, yarn, dynamic past the end) and tied heads vs transformers'
LlamaForCausalLM (fp32, atol 1e-5), activation checkpointing. The checks every family gets
(pp=2 step, packing, conversion) are in tests/test_families.py."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models import llama
from models.attention import AttnOptions
from models.block_base import LayerOptions
from models.keymap import model_from_hf
from models.pipeline import SequentialModel
from tests.model_check import sequential_forward, shifted_labels

ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "default": None,
}


def reference(hf_config: dict, seed: int = 0):
    """A random transformers model and its weights in our per-layer layout."""
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(LlamaConfig(**hf_config)).eval()
    sd = ref.state_dict()
    args = llama.Args.from_hf_config(hf_config)
    state = model_from_hf(llama, args, sd.__getitem__)
    return ref, state


def hf_loss_and_logits(ref, ids):
    with torch.no_grad():
        out = ref(ids, labels=ids)
    return float(out.loss), out.logits


@pytest.mark.parametrize("rope", ROPES, ids=str)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sequential_matches_transformers(rope, tie):
    hf = llama.tiny_hf_config(rope_scaling=ROPES[rope], tie_word_embeddings=tie)
    assert hf["num_key_value_heads"] < hf["num_attention_heads"]  # GQA on
    ref, state = reference(hf)
    ids = torch.randint(0, hf["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_logits = hf_loss_and_logits(ref, ids)
    loss, logits = sequential_forward("llama", hf, state, ids, shifted_labels(ids))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert abs(loss - ref_loss) < 1e-5


def test_dynamic_rope_past_max_positions_matches_transformers():
    """rope_scaling dynamic: past max_position_embeddings transformers recomputes the frequencies
    from the sequence length. A long document alone and inside a packed row (next to a short one
    that keeps the original frequencies) equal transformers on each document alone."""
    hf = llama.tiny_hf_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32)
    ref, state = reference(hf, seed=6)
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(4, hf["vocab_size"], (n,), generator=g) for n in (20, 45)]
    # Short before long: transformers up to at least 5.6 keeps a long call's frequencies for later short calls.
    _, short_ref = hf_loss_and_logits(ref, docs[0][None])
    _, long_ref = hf_loss_and_logits(ref, docs[1][None])
    _, long_ours = sequential_forward("llama", hf, state, docs[1][None], shifted_labels(docs[1][None]))
    torch.testing.assert_close(long_ours, long_ref, atol=1e-5, rtol=0)
    plain = dict(hf, rope_scaling=None)  # what training did before: plain rope past the end
    _, long_plain = sequential_forward("llama", plain, state, docs[1][None], shifted_labels(docs[1][None]))
    assert (long_plain - long_ref).abs().max() > 1e-4  # 1e-3 here: random weights attend almost uniformly
    packed = SequentialModel(llama, llama.Args.from_hf_config(hf), LayerOptions(attn=AttnOptions(packed=True))).eval()
    packed.load_state_dict(state)
    with torch.no_grad():
        row = packed(torch.cat(docs)[None], torch.cat([torch.arange(len(d)) for d in docs])[None])[0]
    torch.testing.assert_close(row[:20], short_ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(row[20:], long_ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients(mode):
    hf = llama.tiny_hf_config()
    _, state = reference(hf)
    args = llama.Args.from_hf_config(hf)
    ids = torch.randint(0, hf["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    grads = {}
    for m in ("none", mode):
        model = SequentialModel(llama, args, LayerOptions(grad_ckpt=m)).train()
        model.load_state_dict(state)
        model(ids).float().logsumexp(-1).sum().backward()
        grads[m] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.equal(grads["none"], grads[mode])
