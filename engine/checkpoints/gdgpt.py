"""gdGPT's checkpoint dirs, read in place (github.com/CoinCheung/gdGPT).

gdGPT writes one file per pipeline layer holding that layer's HF tensors under the names the
HF module had inside the layer (its `convert_model.py hg_to_pp`, and DeepSpeed's pipeline
`save_checkpoint` in its `train_ds.py`):

    <dir>/layer_00-model_states.pt            embedding  (llama: embed_tokens.weight; bloom: word_embeddings.*)
    <dir>/layer_{i+1:02d}-model_states.pt     block i: its HF keys without `model.layers.{i}.` (llama) /
                                               `transformer.h.{i}.` (bloom) / `transformer.encoder.layers.{i}.`
    <dir>/layer_{L+1:02d}-model_states.pt     final norm + head, under the embedding layer's names (llama,
                                               mixtral: lm_head as embed_tokens.weight; bloom: ln_f as
                                               word_embeddings_layernorm.*, lm_head as word_embeddings.weight)
    <dir>/config.json, tokenizer files         (hg_to_pp also writes an empty model.safetensors)

as the dir `hg_to_pp` writes, as a training tag (`<save_path>/checkpoint_final`), or as the whole
save_path, whose DeepSpeed `latest` names that tag. No `hf/` and no meta.json: that and the names
tell it from ours. `GdgptWeights` serves these tensors by their HF names, so the one weight
loader (engine/checkpoints/weights.py) reads them through the family's HF key map like an HF dir.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoints.files import LAYOUTS, LayoutError, ModelDir, is_pipeline_dir, layer_file, load_layer, resolve_tag

# per family: HF key of the embedding / head tensors -> name inside gdGPT's first / last layer file
EMBED = {
    "llama": {"model.embed_tokens.weight": "embed_tokens.weight"},
    "bloom": {"transformer.word_embeddings.weight": "word_embeddings.weight",
              "transformer.word_embeddings_layernorm.weight": "word_embeddings_layernorm.weight",
              "transformer.word_embeddings_layernorm.bias": "word_embeddings_layernorm.bias"},
    "chatglm": {"transformer.embedding.word_embeddings.weight": "word_embeddings.weight"},
}
HEAD = {
    "llama": {"model.norm.weight": "norm.weight", "lm_head.weight": "embed_tokens.weight"},
    "baichuan": {"model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"},
    "bloom": {"transformer.ln_f.weight": "word_embeddings_layernorm.weight",
              "transformer.ln_f.bias": "word_embeddings_layernorm.bias", "lm_head.weight": "word_embeddings.weight"},
    "chatglm": {"transformer.output_layer.weight": "output_layer.weight",
                "transformer.encoder.final_layernorm.weight": "final_layernorm.weight"},
}
BLOCKS = {"llama": "model.layers.", "baichuan": "model.layers.", "mixtral": "model.layers.", "bloom": "transformer.h.",
          "chatglm": "transformer.encoder.layers."}
EMBED.update(baichuan=EMBED["llama"], mixtral=EMBED["llama"])
HEAD.update(mixtral=HEAD["llama"])


def _holds_gdgpt_layers(d: Path) -> bool:
    return layer_file(d, 0).is_file() and (d / "config.json").is_file()


def detect(path: Path) -> ModelDir | None:
    """gdGPT's hg_to_pp dir or training tag (layer files beside config.json, no `latest`), or its
    save_path (`latest` naming such a tag, and no hf/ of ours)."""
    if not is_pipeline_dir(path):
        return ModelDir(path, path, lambda tag: _no_tags(path, tag), gdgpt=True) if _holds_gdgpt_layers(path) else None
    if (path / "hf" / "config.json").is_file() or (path / "config.json").is_file():
        return None  # ours (or a DeepSpeed dir with its config beside `latest`)
    try:
        tag_dir = resolve_tag(path)
    except LayoutError:
        return None
    return ModelDir(path, tag_dir, lambda tag: resolve_tag(path, tag), gdgpt=True) if _holds_gdgpt_layers(tag_dir) \
        else None


def _no_tags(path: Path, tag: str | None) -> Path:
    if tag is not None:
        raise LayoutError(f"{path}: a gdGPT layer dir has no checkpoint tags (tag {tag!r} asked for)")
    return path


LAYOUTS.insert(0, detect)  # before the HF detector: hg_to_pp's config.json would otherwise make it "HF"


class GdgptWeights:
    """The tensors of a gdGPT layer dir by their HF names (`get`, `shape`, as HFWeights)."""

    def __init__(self, layer_dir: Path, family: str, n_blocks: int):
        if family not in BLOCKS:
            raise LayoutError(f"{layer_dir}: gdGPT layer files of family {family!r} are not supported")
        self.dir, self.family, self.n_blocks = layer_dir, family, n_blocks
        self._cache: tuple[Path, dict] | None = None

    def where(self, key: str) -> tuple[Path, str]:
        """(layer file, name inside it) of the HF tensor `key`."""
        prefix = BLOCKS[self.family]
        if key.startswith(prefix):
            index, _, inner = key[len(prefix):].partition(".")
            if index.isdigit() and int(index) < self.n_blocks:
                return layer_file(self.dir, int(index) + 1), inner
        for idx, table in ((0, EMBED[self.family]), (self.n_blocks + 1, HEAD[self.family])):
            if key in table:
                return layer_file(self.dir, idx), table[key]
        raise LayoutError(f"{self.dir}: gdGPT's layer files have no place for '{key}' — not a {self.family} checkpoint")

    def get(self, key: str) -> torch.Tensor:
        f, inner = self.where(key)
        if self._cache is None or self._cache[0] != f:  # one file mapped at a time
            self._cache = (f, load_layer(f))
        state = self._cache[1]
        if inner not in state:
            raise LayoutError(f"{f}: tensor '{inner}' missing (gdGPT layout; the model needs it as '{key}')")
        return state[inner]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.get(key).shape)  # memory-mapped: reading the shape reads no data
