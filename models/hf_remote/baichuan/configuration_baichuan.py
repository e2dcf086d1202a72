"""Baichuan / Baichuan2 configuration (remote code written next to converted checkpoints).

Reads the public config.json fields. The public checkpoints do not record rotary vs ALiBi or
whether lm_head is a NormHead: 7B-sized models (hidden_size 4096, or Baichuan-7B v1's class name
BaiChuanForCausalLM) use rotary, 13B ALiBi;
Baichuan2 (vocab 125696) normalises lm_head rows, v1 (vocab 64000) does not. Exports write both
choices explicitly as `position_embedding` and `norm_head`.
"""
from transformers import PretrainedConfig


class BaichuanConfig(PretrainedConfig):
    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=125696, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, hidden_act="silu", max_position_embeddings=None, model_max_length=4096,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, z_loss_weight=0.0, position_embedding=None,
                 norm_head=None, rope_theta=10000.0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.model_max_length = model_max_length
        self.max_position_embeddings = max_position_embeddings or model_max_length
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.z_loss_weight = z_loss_weight
        if position_embedding is None and "BaiChuanForCausalLM" in (kwargs.get("architectures") or []):
            position_embedding = "rope"  # Baichuan-7B v1's class name
        self.position_embedding = (position_embedding or ("rope" if hidden_size == 4096 else "alibi")).lower()
        self.norm_head = norm_head if norm_head is not None else vocab_size != 64000
        self.rope_theta = rope_theta
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
