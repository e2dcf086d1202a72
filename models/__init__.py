"""Model families. A family is one module with the same small interface:

    MODEL_TYPES      HF `model_type` values it handles
    HF_ARCHITECTURE  the `architectures` entry written on export
    TIED_WEIGHTS     parameter names shared by tied embedding/head twins
    Args             dataclass with `from_hf_config(dict)` and `num_layers`
    layers(args)     pipeline layers grouped as `parts` counts them
    hf_keys(args)    per internal layer: {our param name: HF checkpoint key, or keymap.Fused(HF
                     keys) for a fused projection}; keymap.from_hf / to_hf apply it
    dims(args)       the model's dimensions as `Dims` (what planning and MFU read; no field-name guessing)
    tiny_hf_config() a tiny random config for tests

Optional: HF_BASE_PREFIX (hub checkpoints that store the base model's keys without it),
REMOTE_CODE_DIR + export_hf_config(hf) (families transformers lacks), make_loss(args) (a loss
other than plain causal LM, e.g. MoE's router loss), HF_NOT_LINEAR (prefixes of our parameter
names that are no nn.Linear in transformers: never LoRA targets).

Every transformer block subclasses block_base.BlockBase (docs/ARCHITECTURE.md, the family interface).

Adding a family = one module + one line in FAMILIES (tests/test_families.py then checks it).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

FAMILIES = {
    "llama": "models.llama",
    "bloom": "models.bloom",
    "mixtral": "models.mixtral",
    "baichuan": "models.baichuan",
    "chatglm": "models.chatglm",
}


@dataclass(frozen=True)
class Dims:
    """A family's dimensions under one set of names (`family.dims(args)`)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # MLP inner size (per expert under MoE)
    gated: bool  # gate + up projections (SwiGLU) rather than one up projection
    n_layers: int  # transformer blocks
    vocab: int
    norm_eps: float
    positional: str  # "rope" | "alibi"
    tied: bool  # lm_head shares the embedding matrix
    max_positions: int | None  # context the model was built for (None: no fixed limit, e.g. ALiBi)
    experts: int = 0  # MoE experts per block (0: dense MLP)
    top_k: int = 0  # experts each token runs
    window: int | None = None  # sliding-window attention span (mixtral's sliding_window; None: every earlier key)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_params(self) -> int:
        """Weights of one MLP (one expert), biases left out."""
        return (3 if self.gated else 2) * self.hidden * self.ffn


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(family_names())})")
    return importlib.import_module(FAMILIES[name])


class UnsupportedModel(ValueError):
    """An HF config no family handles (a user error: reported as one line by the CLIs)."""


def family_for_hf_config(hf: dict, where: str = "config.json") -> ModuleType:
    """The family that handles an HF config dict, by its `model_type`."""
    model_type = hf.get("model_type")
    for name in FAMILIES:
        family = get_family(name)
        if model_type in family.MODEL_TYPES:
            return family
    raise UnsupportedModel(f"{where}: model_type {model_type!r} is not supported "
                     f"(supported: {', '.join(family_names())})")
