"""Dirs laid out as gdGPT's own code writes them (github.com/CoinCheung/gdGPT), from an HF dir.

`write_gdgpt_dir` = its `convert_model.py hg_to_pp`: one torch file per pipeline layer holding
that layer's HF tensors under their names inside the layer (block i: HF keys without
`model.layers.{i}.` / `transformer.h.{i}.`, in layer_{i+1:02d}); the embedding in layer_00; in
the last file the final norm and lm_head under the embedding layer's names (llama: norm.weight +
lm_head as embed_tokens.weight; bloom: ln_f as word_embeddings_layernorm.*, lm_head as
word_embeddings.weight); then config.json, generation_config.json, the tokenizer, and the empty
model.safetensors that `save_pretrained(state_dict={})` leaves. `write_gdgpt_run` = its
`train_ds.py` output: save_path/latest naming checkpoint_final, which holds the same layer files
plus DeepSpeed's mp_rank file, config and tokenizer.
"""
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = {"llama": "model.layers.", "bloom": "transformer.h."}
FIRST = {"llama": {"embed_tokens.weight": "model.embed_tokens.weight"},
         "bloom": {"word_embeddings.weight": "transformer.word_embeddings.weight",
                   "word_embeddings_layernorm.weight": "transformer.word_embeddings_layernorm.weight",
                   "word_embeddings_layernorm.bias": "transformer.word_embeddings_layernorm.bias"}}
LAST = {"llama": {"norm.weight": "model.norm.weight", "embed_tokens.weight": "lm_head.weight"},
        "bloom": {"word_embeddings_layernorm.weight": "transformer.ln_f.weight",
                  "word_embeddings_layernorm.bias": "transformer.ln_f.bias",
                  "word_embeddings.weight": "lm_head.weight"}}


def hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(f))
    if "lm_head.weight" not in state:  # tied: HF's state_dict() lists the shared matrix under both names
        state["lm_head.weight"] = state.get("transformer.word_embeddings.weight", state.get("model.embed_tokens.weight"))
    return state


def write_gdgpt_dir(hf_dir: Path, out: Path, family: str, dtype=torch.float16) -> Path:
    state = {k: v.to(dtype) for k, v in hf_state(hf_dir).items()}
    out.mkdir(parents=True)
    layers: dict[int, dict] = {0: {k: state[v] for k, v in FIRST[family].items()}}
    for key, tensor in state.items():
        if key.startswith(BLOCK[family]):
            index, _, inner = key[len(BLOCK[family]):].partition(".")
            layers.setdefault(int(index) + 1, {})[inner] = tensor
    last = max(layers) + 1
    layers[last] = {k: state[v] for k, v in LAST[family].items()}
    for idx, tensors in layers.items():
        torch.save(tensors, out / f"layer_{idx:02d}-model_states.pt")
    for f in Path(hf_dir).iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy2(f, out / f.name)
    save_file({}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_gdgpt_run(hf_dir: Path, save_path: Path, family: str) -> Path:
    tag = write_gdgpt_dir(hf_dir, save_path / "checkpoint_final", family)
    torch.save({"module": None, "global_steps": 10}, tag / "mp_rank_00_model_states.pt")
    (save_path / "latest").write_text("checkpoint_final")
    return save_path
