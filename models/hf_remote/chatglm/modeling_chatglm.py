"""ChatGLM2/3 causal LM for transformers, loaded with `trust_remote_code=True`.

Written from the architecture for checkpoints converted by this toolkit (and the public ones:
same tensor names). Self-contained: it is copied next to the weights and must not import the
toolkit. Batch-first. Pre-norm RMSNorm blocks; multi-query attention (`multi_query_group_num`
k/v heads shared by consecutive query heads) through one biased `query_key_value`; rotary on the
first half of each head's dims, adjacent pairs rotated, base 10000 * rope_ratio; SwiGLU with
gate and up stacked in `dense_h_to_4h`; untied `output_layer`.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def rotary_tables(position_ids, head_dim, base, dtype):
    """cos, sin [B, 1, S, head_dim/4]: one angle per rotated pair of the first head_dim/2 dims."""
    n = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, n, 2, device=position_ids.device).float() / n))
    freqs = position_ids[..., None].float() * inv_freq
    return freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]


def apply_rotary(x, cos, sin):
    n = 2 * cos.shape[-1]
    pairs = x[..., :n].unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., n:]), dim=-1)


def attention_mask_4d(attention_mask, batch, q_len, kv_len, device):
    """Boolean [B, 1, q_len, kv_len] (True = attend): causal over the cache, and the 2D padding
    mask. Query rows with nothing to attend to (padding) attend everywhere, so no NaN appears."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    i = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    mask = (torch.arange(kv_len, device=device)[None, :] <= i)[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -kv_len:].bool()
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask


# transformers 5.x renamed the KV cache from `past_key_values` to `cache` (forward argument, output
# field; generate passes and reads the new name). Both are accepted; outputs use the installed name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.num_groups = config.multi_query_group_num if config.multi_query_attention else self.num_heads
        self.base = 10000.0 * config.rope_ratio
        self.layer_idx = layer_idx
        qkv = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv, bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x, position_ids, mask, cache=None):
        b, s, _ = x.shape
        d, g = self.head_dim, self.num_groups
        q, k, v = self.query_key_value(x).split([self.num_heads * d, g * d, g * d], dim=-1)
        q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
        cos, sin = rotary_tables(position_ids, d, self.base, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # cached per group, not per head
        rep = self.num_heads // g  # query head j reads group j // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, position_ids, mask, cache=None):
        x = x + self.self_attention(self.input_layernorm(x), position_ids, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _supports_cache_class = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]  # a buffer in public checkpoints

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None,
                past_key_values=None, **kwargs):
        """Final-normed hidden states (ChatGLMForConditionalGeneration applies output_layer)."""
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        b, s, _ = inputs_embeds.shape
        cache = cache if cache is not None else past_key_values
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=inputs_embeds.device).expand(b, s)
        mask = attention_mask_4d(attention_mask, b, s, past + s, inputs_embeds.device)
        hidden, all_hidden = inputs_embeds, ()
        for layer in self.encoder.layers:
            if output_hidden_states:
                all_hidden += (hidden,)
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, position_ids, mask, None)
            else:
                hidden = layer(hidden, position_ids, mask, cache)
        hidden = self.encoder.final_layernorm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        out = BaseModelOutputWithPast(last_hidden_state=hidden,
                                      hidden_states=all_hidden if output_hidden_states else None,
                                      **{CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep: Optional[int] = 0, past_key_values=None, **kwargs):
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.transformer.output_layer(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()
