"""Baichuan quirks: an independent reference, our layers and our HF remote code agree (fp32, atol
1e-5) for rope and ALiBi; public config.json / key names; NormHead; the public .bin layout's
conversion round trip; generate. The checks every family gets are in tests/test_families.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import baichuan
from models.attention import AttnOptions
from models.block_base import LayerOptions
from models.positions import alibi_slopes
from models.keymap import hf_names
from models.pipeline import SequentialModel
from tests.hf_remote_check import (check_generate, hf_forward, hf_state, load_remote, random_state, round_trip,
                                   write_hf_dir, write_public_dir, written_tensors)
from tests.model_check import sequential_forward, shifted_labels

# The public config.json files (Baichuan2-7B-Base / Baichuan2-13B-Base), minus auto_map.
PUBLIC_7B = dict(architectures=["BaichuanForCausalLM"], tokenizer_class="BaichuanTokenizer", bos_token_id=1,
                 eos_token_id=2, hidden_act="silu", hidden_size=4096, initializer_range=0.02, intermediate_size=11008,
                 max_position_embeddings=4096, model_max_length=4096, model_type="baichuan", num_attention_heads=32,
                 num_hidden_layers=32, pad_token_id=0, rms_norm_eps=1e-06, tie_word_embeddings=False,
                 torch_dtype="bfloat16", use_cache=True, vocab_size=125696, z_loss_weight=0)
PUBLIC_13B = dict(architectures=["BaichuanForCausalLM"], tokenizer_class="BaichuanTokenizer", bos_token_id=1,
                  eos_token_id=2, hidden_act="silu", hidden_size=5120, initializer_range=0.02, intermediate_size=13696,
                  model_max_length=4096, model_type="baichuan", num_attention_heads=40, num_hidden_layers=40,
                  pad_token_id=0, rms_norm_eps=1e-06, tie_word_embeddings=False, torch_dtype="bfloat16",
                  use_cache=True, vocab_size=125696, z_loss_weight=0)
VARIANTS = {"rope": {}, "alibi": dict(position_embedding="alibi", hidden_size=48, num_attention_heads=6)}


def tiny(variant):
    return baichuan.tiny_hf_config(**VARIANTS[variant])


def reference_logits(hf: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """Baichuan written out from its definition on the public key names (shares no code with models/)."""
    h, n = hf["hidden_size"], hf["num_attention_heads"]
    d, b, s = h // n, *ids.shape
    pos = torch.arange(s, dtype=torch.float32)

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + hf["rms_norm_eps"])

    def heads(t):
        return t.view(b, s, n, d).transpose(1, 2)

    def rope(t):  # llama layout: dims i and i + d/2 rotate together by pos * 10000^(-2i/d)
        ang = pos[:, None] * 10000.0 ** (-torch.arange(0, d, 2).float() / d)
        c, sn, t1, t2 = ang.cos(), ang.sin(), t[..., :d // 2], t[..., d // 2:]
        return torch.cat((t1 * c - t2 * sn, t2 * c + t1 * sn), -1)

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"])
        w = sd[p + "self_attn.W_pack.weight"]
        q, k, v = (heads(a @ w[j * h:(j + 1) * h].T) for j in range(3))  # W_pack rows = [q; k; v]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if hf["position_embedding"] == "rope":
            scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d)
        else:
            scores = scores - alibi_slopes(n)[:, None, None] * (pos[:, None] - pos[None, :])
        scores = scores.masked_fill(pos[:, None] < pos[None, :], float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h) @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    head = sd["lm_head.weight"]
    return rms(x, sd["model.norm.weight"]) @ (head / head.norm(dim=1, keepdim=True)).T  # NormHead


def test_public_configs_choose_rope_or_alibi_and_norm_head():
    a7, a13 = baichuan.Args.from_hf_config(PUBLIC_7B), baichuan.Args.from_hf_config(PUBLIC_13B)
    assert (a7.position_embedding, a7.norm_head, a7.max_position_embeddings) == ("rope", True, 4096)
    assert (a13.position_embedding, a13.norm_head, a13.max_position_embeddings) == ("alibi", True, 4096)
    v1 = baichuan.Args.from_hf_config({**PUBLIC_7B, "vocab_size": 64000})  # Baichuan-7B v1: plain lm_head
    assert not v1.norm_head
    exported = baichuan.export_hf_config(PUBLIC_13B)
    assert exported["position_embedding"] == "alibi" and exported["norm_head"] is True
    assert exported["auto_map"]["AutoModelForCausalLM"] == "modeling_baichuan.BaichuanForCausalLM"
    from models.hf_remote.baichuan.configuration_baichuan import BaichuanConfig  # remote code: same rule
    assert BaichuanConfig(**PUBLIC_13B).position_embedding == "alibi"
    assert BaichuanConfig(**PUBLIC_7B).position_embedding == "rope"
    with pytest.raises(ValueError, match="z_loss_weight"):
        baichuan.Args.from_hf_config({**PUBLIC_7B, "z_loss_weight": 1e-3})


def test_position_embedding_read_from_config_else_guessed_with_a_warning(capsys):
    baichuan._warn_once.cache_clear()
    read = [({**PUBLIC_7B, "position_embedding": "alibi"}, "alibi"),  # ours, even against the size rule
            ({**PUBLIC_13B, "position_embedding": "ROPE"}, "rope"),  # vLLM-style spelling
            ({**PUBLIC_13B, "hidden_size": 4096, "architectures": ["BaiChuanForCausalLM"], "vocab_size": 64000},
             "rope")]  # Baichuan-7B v1
    from models.hf_remote.baichuan.configuration_baichuan import BaichuanConfig  # remote code: same rule
    for hf, want in read:
        assert baichuan.Args.from_hf_config(hf).position_embedding == want
        assert BaichuanConfig(**hf).position_embedding == want
    assert capsys.readouterr().err == ""
    for hf, want in ((PUBLIC_13B, "alibi"), (PUBLIC_13B, "alibi"), (PUBLIC_7B, "rope")):  # public: guessed
        assert baichuan.Args.from_hf_config(hf).position_embedding == want
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "guessed 'alibi' from hidden_size=5120" in err[0] and "hidden_size=4096" in err[1], err
    with pytest.raises(ValueError, match="position_embedding 'nope'"):
        baichuan.Args.from_hf_config({**PUBLIC_7B, "position_embedding": "nope"})


def test_public_key_names():
    keys = baichuan.hf_keys(baichuan.Args.from_hf_config(PUBLIC_7B))
    assert len(keys) == 34
    assert keys[0] == {"embed_tokens.weight": "model.embed_tokens.weight"}
    assert sorted(k for v in keys[32].values() for k in hf_names(v)) == [f"model.layers.31.{k}" for k in sorted([
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.W_pack.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"])]
    assert keys[33] == {"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def test_alibi_slopes_known_values():
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.equal(alibi_slopes(6), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]))
    want40 = [2.0 ** (-0.25 * (i + 1)) for i in range(32)] + [2.0 ** (-0.125 * (2 * i + 1)) for i in range(8)]
    torch.testing.assert_close(alibi_slopes(40), torch.tensor(want40), atol=1e-7, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layers_and_remote_code_match_reference(tmp_path, variant):
    hf = tiny(variant)
    args = baichuan.Args.from_hf_config(hf)
    state = random_state(baichuan, args, seed=1)
    ids = torch.randint(0, hf["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(hf, hf_state(baichuan, args, state), ids)
    loss, logits = sequential_forward("baichuan", hf, state, ids, shifted_labels(ids))
    remote = load_remote(write_hf_dir(baichuan, hf, state, tmp_path / "hf"))
    hf_loss, hf_logits = hf_forward(remote, ids)
    print(f"{variant}: ours-ref {(logits - ref).abs().max():.2e} remote-ref {(hf_logits - ref).abs().max():.2e} "
          f"loss diff {abs(loss - hf_loss):.2e}")
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_logits, ref, atol=1e-5, rtol=0)
    assert abs(loss - hf_loss) < 1e-5


def test_norm_head_ignores_row_scale():
    hf = tiny("rope")
    args = baichuan.Args.from_hf_config(hf)
    state = random_state(baichuan, args)
    ids = torch.randint(0, hf["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    scaled = dict(state)
    scaled["5.lm_head.weight"] = state["5.lm_head.weight"] * (torch.rand(hf["vocab_size"], 1) * 5 + 0.1)
    _, a = sequential_forward("baichuan", hf, state, ids, shifted_labels(ids))
    _, b = sequential_forward("baichuan", hf, scaled, ids, shifted_labels(ids))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    v1 = dict(hf, norm_head=False)  # a plain head does see the scale
    _, c = sequential_forward("baichuan", v1, scaled, ids, shifted_labels(ids))
    assert not torch.allclose(a, c, atol=1e-2)


@pytest.mark.parametrize("variant", ["alibi"])  # rope: tests/test_families.py
def test_packed_row_equals_documents_alone(variant):
    hf = tiny(variant)
    args = baichuan.Args.from_hf_config(hf)
    state = random_state(baichuan, args, seed=6)
    packed = SequentialModel(baichuan, args, LayerOptions(attn=AttnOptions(packed=True))).eval()
    packed.load_state_dict(state)
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(4, hf["vocab_size"], (n,), generator=g) for n in (7, 12, 5)]
    ids, pos = torch.cat(docs)[None], torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        row, start = packed(ids, pos)[0], 0
        for d in docs:
            torch.testing.assert_close(row[start:start + len(d)], packed(d[None])[0], atol=1e-5, rtol=0)
            start += len(d)
        plain = SequentialModel(baichuan, args).eval()
        plain.load_state_dict(state)
        assert not torch.allclose(plain(ids, pos)[0], row, atol=1e-3)  # the document mask matters


@pytest.mark.parametrize("variant", VARIANTS)
def test_public_layout_round_trip_loads_and_generates(tmp_path, variant):
    from transformers import AutoTokenizer

    hf = tiny(variant)
    if variant == "alibi":  # as published: no position_embedding field; hidden_size != 4096 means ALiBi
        del hf["position_embedding"]
    hf["auto_map"] = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                      "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
    args = baichuan.Args.from_hf_config(hf)
    state = random_state(baichuan, args, seed=8)
    src = write_public_dir(baichuan, hf, state, tmp_path / "public",
                           side_files={"modeling_baichuan.py": "raise ImportError('the public file: replaced')\n",
                                       "tokenization_baichuan.py": "# the public tokenizer code: carried over\n"})
    out, source, pp_state = round_trip(src, tmp_path)
    written = written_tensors(out)
    assert set(written) == set(source)
    for k in source:
        assert written[k].dtype == source[k].dtype and torch.equal(written[k], source[k]), k
    assert (out / "configuration_baichuan.py").is_file() and "replaced" not in (out / "modeling_baichuan.py").read_text()
    assert "carried over" in (out / "tokenization_baichuan.py").read_text()
    model = load_remote(out)
    assert type(model).__name__ == "BaichuanForCausalLM"
    assert model.config.position_embedding == VARIANTS[variant].get("position_embedding", "rope")
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ids = torch.tensor([tok("hello world, a tiny model").input_ids[:8]] * 2)
    ids[1] = ids[1].flip(0)
    _, logits = sequential_forward("baichuan", hf, pp_state, ids, shifted_labels(ids))
    torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
    check_generate(model, ids)
