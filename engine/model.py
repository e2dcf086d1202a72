"""What the engine knows about a model: its family, its Args, where its HF files are, its layers.

One descriptor used by training, planning, conversion and generation (`Model.from_dir`), and the
per-layer parameter shapes every loader checks against (`expected_shapes`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from models import family_for_hf_config
from models.hf_config import args_from_hf_config
from models.pipeline import SequentialModel, layer_groups

from engine.checkpoints.files import LayoutError, locate, read_hf_config, read_json
from engine.config import ConfigError


def expected_shapes(family, args) -> list[dict[str, torch.Size]]:
    """Per internal layer: {param name: shape}, from the family's layers built on the meta device."""
    with torch.device("meta"):
        model = SequentialModel(family, args)
    return [{k: p.shape for k, p in model._modules[str(i)].state_dict().items()} for i in range(len(model.defs))]


@dataclass
class Model:
    """What the loop needs to know about the model being trained."""

    family: object
    args: object
    hf_dir: Path
    n_layers: int  # pipeline layers as `parts` counts them

    @classmethod
    def from_dir(cls, model_path: str | Path) -> "Model":
        where = locate(model_path)
        hf_dir = where.hf_dir
        if not where.is_hf and not (hf_dir / "config.json").is_file():
            raise LayoutError(f"{where.path}: a pipeline checkpoint dir without the model's HF config (hf/config.json);"
                              f" copy config.json and the tokenizer files of the model it was trained from into "
                              f"{where.path / 'hf'}")
        hf = read_hf_config(hf_dir)
        family = family_for_hf_config(hf, str(hf_dir / "config.json"))
        args = args_from_hf_config(family, hf, str(hf_dir / "config.json"))  # every field read is checked
        return cls(family, args, hf_dir, len(layer_groups(family, args)))

    @classmethod
    def for_training(cls, cfg) -> "Model":
        """from_dir(cfg.model_path) with the training config's model-side keys in Args:
        router_z_loss_coef, which only a family whose Args has that field (MoE) takes."""
        model = cls.from_dir(cfg.model_path)
        if cfg.router_z_loss_coef > 0:  # a bad value is validate's to report
            if "router_z_loss_coef" not in {f.name for f in dataclasses.fields(model.args)}:
                raise ConfigError(f"{cfg.source}: router_z_loss_coef applies to MoE families only "
                                  f"({model.name} is dense); remove it or set it to 0")
            model.args = dataclasses.replace(model.args, router_z_loss_coef=float(cfg.router_z_loss_coef))
        return model

    @property
    def dims(self):
        """models.Dims: the model's dimensions under the family-independent names."""
        return self.family.dims(self.args)

    @property
    def name(self) -> str:
        return self.family.__name__.split(".")[-1]

    def n_params(self) -> int:
        seen, total = set(), 0
        for idx, (layer, shapes) in enumerate(zip(self.family.hf_keys(self.args), expected_shapes(self.family, self.args))):
            for ours, theirs in layer.items():
                if theirs not in seen:
                    seen.add(theirs)
                    total += math.prod(shapes[ours])
        return total


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError)


def load_tokenizer(hf_dir: str | Path):
    """The model dir's tokenizer (AutoTokenizer; remote code allowed: public baichuan/chatglm ship
    theirs as code). Its files are user input: a damaged one is one LayoutError line naming it."""
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    for name in TOKENIZER_JSON:  # parse errors named by file and line, before transformers reads them
        if (hf_dir / name).is_file():
            read_json(hf_dir / name, "tokenizer file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    except Exception as e:
        # a damaged file surfaces as one of these from transformers, or as a plain Exception from the
        # tokenizers library (Rust); any other exception is a bug and keeps its traceback
        if not (isinstance(e, TOKENIZER_ERRORS) or type(e) is Exception):
            raise
        raise LayoutError(f"{hf_dir}: the tokenizer cannot be loaded ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        import jinja2

        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        except jinja2.TemplateSyntaxError as e:
            raise LayoutError(f"{hf_dir}: the tokenizer's chat_template is not a valid template (line {e.lineno}: "
                              f"{e.message})") from None
    return tokenizer
