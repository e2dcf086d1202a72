"""ChatGLM3 quirks: an independent reference, our layers and our HF remote code agree (fp32, atol
1e-5); half-dim interleaved rotary by hand; public config.json / key names; conversion round
trip from the public .bin layout; generate. The checks every family gets (pp=2 step, packing)
are in tests/test_families.py."""
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import chatglm
from models.positions import Rotary, apply_rotary_interleaved
from models.hf_remote.chatglm import modeling_chatglm as remote
from tests.hf_remote_check import (check_generate, hf_forward, hf_state, load_remote, random_state, round_trip,
                                   write_hf_dir, write_public_dir, written_tensors)
from tests.model_check import sequential_forward, shifted_labels

# The public THUDM/chatglm3-6b config.json, minus auto_map.
PUBLIC = dict(model_type="chatglm", architectures=["ChatGLMModel"], add_bias_linear=False, add_qkv_bias=True,
              apply_query_key_layer_scaling=True, apply_residual_connection_post_layernorm=False,
              attention_dropout=0.0, attention_softmax_in_fp32=True, bias_dropout_fusion=True, ffn_hidden_size=13696,
              fp32_residual_connection=False, hidden_dropout=0.0, hidden_size=4096, kv_channels=128,
              layernorm_epsilon=1e-05, multi_query_attention=True, multi_query_group_num=2, num_attention_heads=32,
              num_layers=28, original_rope=True, padded_vocab_size=65024, post_layer_norm=True, rmsnorm=True,
              seq_length=8192, use_cache=True, torch_dtype="float16", tie_word_embeddings=False, eos_token_id=2,
              pad_token_id=0)
PUBLIC_BLOCK_KEYS = ["input_layernorm.weight", "self_attention.query_key_value.weight",
                     "self_attention.query_key_value.bias", "self_attention.dense.weight",
                     "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"]


def reference_logits(hf: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM3 written out from its definition on the public key names (shares no code with
    models/): rotary as complex multiplication of (x0 + i x1) pairs, one loop step per query head."""
    n, g, d, f = hf["num_attention_heads"], hf["multi_query_group_num"], hf["kv_channels"], hf["ffn_hidden_size"]
    (b, s), r = ids.shape, d // 2
    pos = torch.arange(s, dtype=torch.float32)
    theta = (10000.0 * hf["rope_ratio"]) ** (-torch.arange(0, r, 2).float() / r)
    turn = torch.polar(torch.ones(s, r // 2), pos[:, None] * theta)

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + hf["layernorm_epsilon"])

    def rope(t):  # [b, s, heads, d]
        z = torch.view_as_complex(t[..., :r].reshape(b, s, -1, r // 2, 2).contiguous()) * turn[None, :, None]
        return torch.cat((torch.view_as_real(z).flatten(-2), t[..., r:]), -1)

    x = sd["transformer.embedding.word_embeddings.weight"][ids]
    causal = pos[:, None] >= pos[None, :]
    for i in range(hf["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"])
        qkv = a @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q = rope(qkv[..., :n * d].reshape(b, s, n, d))
        k = rope(qkv[..., n * d:(n + g) * d].reshape(b, s, g, d))
        v = qkv[..., (n + g) * d:].reshape(b, s, g, d)
        heads = []
        for j in range(n):
            grp = j * g // n  # consecutive query heads share a group
            sc = (q[:, :, j] @ k[:, :, grp].transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, float("-inf"))
            heads.append(sc.softmax(-1) @ v[:, :, grp])
        x = x + torch.cat(heads, -1) @ sd[p + "self_attention.dense.weight"].T
        m = rms(x, sd[p + "post_attention_layernorm.weight"]) @ sd[p + "mlp.dense_h_to_4h.weight"].T
        x = x + (F.silu(m[..., :f]) * m[..., f:]) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    return rms(x, sd["transformer.encoder.final_layernorm.weight"]) @ sd["transformer.output_layer.weight"].T


def test_public_config_and_key_names():
    args = chatglm.Args.from_hf_config(PUBLIC)
    assert (args.vocab_size, args.num_heads, args.num_kv_heads, args.head_dim, args.ffn_hidden_size) == \
        (65024, 32, 2, 128, 13696)
    assert (args.num_layers, args.seq_length, args.rope_theta, args.add_qkv_bias) == (28, 8192, 10000.0, True)
    assert chatglm.Args.from_hf_config({**PUBLIC, "rope_ratio": 50}).rope_theta == 500000.0  # chatglm3-6b-32k
    keys = chatglm.hf_keys(args)
    assert len(keys) == 30
    assert keys[0] == {"word_embeddings.weight": "transformer.embedding.word_embeddings.weight"}
    assert sorted(keys[28].values()) == sorted(f"transformer.encoder.layers.27.{k}" for k in PUBLIC_BLOCK_KEYS)
    assert keys[29] == {"final_layernorm.weight": "transformer.encoder.final_layernorm.weight",
                        "output_layer.weight": "transformer.output_layer.weight"}
    with pytest.raises(ValueError, match="padded_vocab_size"):  # ChatGLM-6B v1: another architecture
        chatglm.Args.from_hf_config({k: v for k, v in PUBLIC.items() if k != "padded_vocab_size"})
    with pytest.raises(ValueError, match="rmsnorm"):
        chatglm.Args.from_hf_config({**PUBLIC, "rmsnorm": False})
    from models.hf_remote.chatglm.configuration_chatglm import ChatGLMConfig
    cfg = ChatGLMConfig(**PUBLIC)
    assert (cfg.num_hidden_layers, cfg.vocab_size, cfg.max_position_embeddings) == (28, 65024, 8192)
    assert chatglm.export_hf_config(PUBLIC)["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_chatglm.ChatGLMForConditionalGeneration"


def test_rotary_rotates_adjacent_pairs_of_the_first_half():
    d, base = 16, 20000.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 5, d, generator=g)  # [B, H, S, D]
    pos = torch.tensor([[0, 3, 7, 1, 12]])
    want = x.clone()
    for s in range(5):
        for p in range(d // 4):  # pair p = dims (2p, 2p+1), angle pos * base^(-2p / (d/2))
            ang = pos[0, s].item() * base ** (-2 * p / (d // 2))
            a, b = x[..., s, 2 * p], x[..., s, 2 * p + 1]
            want[..., s, 2 * p] = a * math.cos(ang) - b * math.sin(ang)
            want[..., s, 2 * p + 1] = b * math.cos(ang) + a * math.sin(ang)
    cos, sin = Rotary(d // 2, {"rope_type": "default", "rope_theta": base}, 64, interleaved=True)(pos, x.dtype)
    ours = apply_rotary_interleaved(x, cos, sin)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    assert torch.equal(ours[..., d // 2:], x[..., d // 2:])
    torch.testing.assert_close(remote.apply_rotary(x, *remote.rotary_tables(pos, d, base, x.dtype)), want,
                               atol=1e-5, rtol=0)


def test_layers_and_remote_code_match_reference(tmp_path):
    hf = chatglm.tiny_hf_config()
    assert 1 < hf["multi_query_group_num"] < hf["num_attention_heads"] and hf["rope_ratio"] != 1
    args = chatglm.Args.from_hf_config(hf)
    state = random_state(chatglm, args, seed=1)
    ids = torch.randint(0, hf["padded_vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(hf, hf_state(chatglm, args, state), ids)
    loss, logits = sequential_forward("chatglm", hf, state, ids, shifted_labels(ids))
    hf_loss, hf_logits = hf_forward(load_remote(write_hf_dir(chatglm, hf, state, tmp_path / "hf")), ids)
    print(f"ours-ref {(logits - ref).abs().max():.2e} remote-ref {(hf_logits - ref).abs().max():.2e} "
          f"loss diff {abs(loss - hf_loss):.2e}")
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_logits, ref, atol=1e-5, rtol=0)
    assert abs(loss - hf_loss) < 1e-5


def test_public_layout_round_trip_loads_and_generates(tmp_path):
    from transformers import AutoTokenizer

    hf = chatglm.tiny_hf_config()
    hf["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                      "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                      "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                      "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"}
    args = chatglm.Args.from_hf_config(hf)
    state = random_state(chatglm, args, seed=8)
    inv_freq = 1.0 / (20000.0 ** (torch.arange(0, 8, 2).float() / 8))  # a buffer the public .bin files carry
    src = write_public_dir(chatglm, hf, state, tmp_path / "public",
                           extra={"transformer.rotary_pos_emb.inv_freq": inv_freq})
    out, source, pp_state = round_trip(src, tmp_path)
    written = written_tensors(out)
    assert set(written) == set(source) - {"transformer.rotary_pos_emb.inv_freq"}
    for k in written:
        assert written[k].dtype == source[k].dtype and torch.equal(written[k], source[k]), k
    cfg = (out / "config.json").read_text()
    assert "ChatGLMForSequenceClassification" not in cfg and '"padded_vocab_size": 320' in cfg
    model = load_remote(out)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ids = torch.tensor([tok("hello world, a tiny model").input_ids[:8]] * 2)
    ids[1] = ids[1].flip(0)
    _, logits = sequential_forward("chatglm", hf, pp_state, ids, shifted_labels(ids))
    torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
    check_generate(model, ids)
    # Our remote code also reads the public layout itself (.bin shards, inv_freq buffer present).
    for f in Path(chatglm.REMOTE_CODE_DIR).glob("*.py"):
        shutil.copy2(f, src / f.name)
    torch.testing.assert_close(load_remote(src)(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
