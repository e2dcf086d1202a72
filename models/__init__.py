"""Model families. A family is one module with the same small interface:

    MODEL_TYPES      HF `model_type` values it handles
    HF_ARCHITECTURE  the `architectures` entry written on export
    TIED_WEIGHTS     parameter names shared by tied embedding/head twins
    Args             dataclass with `from_hf_config(dict)` and `num_layers`
    layers(args)     pipeline layers grouped as `parts` counts them
    hf_keys(args)    per internal layer: {our param name: HF checkpoint key}
    tiny_hf_config() a tiny random config for tests

Adding a family = one module + one line in FAMILIES.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "llama": "models.llama",
    "bloom": "models.bloom",
    "mixtral": "models.mixtral",
    "baichuan": "models.baichuan",
    "chatglm": "models.chatglm",
}


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
