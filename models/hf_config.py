"""An HF config.json as a family reads it, each field checked where it is read.

`family.Args.from_hf_config` reads fields with `hf[key]` (required) and `hf.get(key, default)`
(optional). `args_from_hf_config` hands it a `CheckedConfig` instead of the plain dict: a
missing required key, or a value of the wrong type for what the key means in HF configs
(`hidden_size: "64"`, `vocab_size: -1`, `rope_scaling: 2`), is one UnsupportedModel line naming
the file and the key, instead of a KeyError/TypeError traceback from deep inside a layer. Only
fields a family actually reads are checked, so an unused odd field in a hub config is no error.
Then the few rules between fields that layers rely on (heads divide, top-k <= experts, rope
settings complete) are checked on the Args.
"""
from __future__ import annotations

from . import UnsupportedModel

POSITIVE_INT = ("vocab_size", "padded_vocab_size", "hidden_size", "n_embed", "intermediate_size", "ffn_hidden_size",
                "num_hidden_layers", "num_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads",
                "multi_query_group_num", "head_dim", "kv_channels", "max_position_embeddings", "model_max_length",
                "seq_length", "num_local_experts", "num_experts_per_tok", "sliding_window")
NUMBER = ("rms_norm_eps", "layer_norm_epsilon", "layernorm_epsilon", "rope_theta", "rope_ratio",
          "router_aux_loss_coef", "z_loss_weight")
BOOL = ("tie_word_embeddings", "attention_bias", "mlp_bias", "add_qkv_bias", "add_bias_linear",
        "multi_query_attention", "apply_residual_connection_post_layernorm", "norm_head", "rmsnorm",
        "post_layer_norm", "original_rope")
MAPPING = ("rope_scaling", "rope_parameters", "auto_map")
STRING = ("model_type", "position_embedding")
LIST = ("architectures",)


def _problem(key: str, value) -> str | None:
    """Why `value` cannot be `key`'s value (None: it can, or the key is not one we know)."""
    if value is None:
        return None  # JSON null = not set; a required key says so itself
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in POSITIVE_INT and not (is_int and value > 0):
        return "must be a positive integer"
    if key in NUMBER and not ((is_int or isinstance(value, float)) and value >= 0):
        return "must be a number >= 0"
    if key in BOOL and not isinstance(value, bool):
        return "must be true or false"
    if key in MAPPING and not isinstance(value, dict):
        return "must be an object"
    if key in STRING and not isinstance(value, str):
        return "must be a string"
    if key in LIST and not isinstance(value, list):
        return "must be a list"
    return None


class CheckedConfig(dict):
    """A config.json dict whose reads check the value (see the module doc)."""

    def __init__(self, hf: dict, where: str):
        super().__init__(hf)
        self.where = where
        self._unset = None  # the key of the previous read when it was an unset get() (`get(a) or [b]`)

    def _checked(self, key, value):
        self._unset = None
        problem = _problem(key, value)
        if problem:
            raise UnsupportedModel(f"{self.where}: '{key}' {problem}, got {_json(value)}")
        return value

    def __getitem__(self, key):
        if key not in self or dict.__getitem__(self, key) is None:
            alias = f" (or '{self._unset}')" if self._unset else ""
            raise UnsupportedModel(f"{self.where}: missing key '{key}'{alias} (needed by this model family)")
        return self._checked(key, dict.__getitem__(self, key))

    def get(self, key, default=None):
        value = dict.get(self, key)
        if value is None:
            self._unset = key
            return default
        return self._checked(key, value)

    def keys(self):  # `{**hf}` reads through keys() + __getitem__ (dict's fast path would skip the checks)
        return [k for k, v in dict.items(self) if v is not None]  # null = not set, as get() has it

    def __iter__(self):
        return iter(self.keys())


def _json(value) -> str:
    import json

    text = json.dumps(value) if isinstance(value, (str, int, float, bool, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def args_from_hf_config(family, hf: dict, where: str):
    """`family.Args` from a config.json dict, every field it reads checked; errors name `where`."""
    try:
        args = family.Args.from_hf_config(CheckedConfig(hf, where))
    except UnsupportedModel as e:  # the families' own rejections say "config.json: ..."
        text = str(e)
        raise UnsupportedModel(text if text.startswith(f"{where}: ") else text.replace("config.json: ", f"{where}: ", 1)) \
            from None
    _check_args(args, where)
    return args


def _check_args(args, where: str) -> None:
    heads, kv = getattr(args, "num_heads", None), getattr(args, "num_kv_heads", None)
    if heads and kv and heads % kv:
        raise UnsupportedModel(f"{where}: {heads} attention heads cannot be grouped over {kv} key/value heads "
                               "(num_key_value_heads must divide num_attention_heads)")
    if heads and not hasattr(args, "head_dim") and args.hidden_size % heads:
        raise UnsupportedModel(f"{where}: hidden_size {args.hidden_size} is not a multiple of the {heads} "
                               "attention heads")
    experts, top_k = getattr(args, "num_experts", None), getattr(args, "top_k", None)
    if experts and top_k and top_k > experts:
        raise UnsupportedModel(f"{where}: num_experts_per_tok {top_k} > num_local_experts {experts}")
    rope = getattr(args, "rope", None)
    if isinstance(rope, dict):
        from .positions import rope_inv_freq

        try:  # the layer reads these when it is built; check them now, by the same code
            rope_inv_freq(2 * max(1, getattr(args, "head_dim", 2) // 2), rope, args.max_position_embeddings)
        except KeyError as e:
            raise UnsupportedModel(f"{where}: rope settings ({rope.get('rope_type')}) miss '{e.args[0]}'") from None
        except (TypeError, ValueError) as e:
            raise UnsupportedModel(f"{where}: rope settings {_json(rope)}: {e}") from None
