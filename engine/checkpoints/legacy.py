"""Tags of the previous format without optim/: DeepSpeed's own files, loaded weights-only.

Before format 2 (engine/checkpoints/reshape.py) a tag held DeepSpeed's mp_rank_* model states
and per-rank optimizer partitions; with `reshape_state: false` nothing else restores its
optimizer state. DeepSpeed reads them through its checkpoint engine, whose stock torch.load
unpickles anything (weights_only=False): a crafted file would run code. The engine plugged in
here loads weights-only, allowing the few non-tensor types DeepSpeed stores, and names the file
when one cannot be read (a zero-filled layer file was a KeyError deep inside DeepSpeed).
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoints.files import LayoutError


def _ds_globals() -> list:
    """Non-tensor types DeepSpeed puts into its checkpoint files (optimizer wrappers' state dicts)."""
    import argparse

    out = [argparse.Namespace]  # older DeepSpeed stored its args
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)  # BF16_Optimizer / ZeRO param slice mappings
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16 import loss_scaler

        out += [loss_scaler.LossScaler, loss_scaler.DynamicLossScaler]
    except (ImportError, AttributeError):
        pass
    return out


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading weights-only (see module doc)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_ds_globals()):
                    state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # damaged, or a pickled object weights-only refuses: name the file
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                raise LayoutError(f"{path}: cannot be read ({type(e).__name__}: {first})") from None
            if not isinstance(state, dict):  # DeepSpeed indexes it by key: a list would be a TypeError there
                raise LayoutError(f"{path}: holds {'None' if state is None else 'a ' + type(state).__name__}, "
                                  "not a DeepSpeed checkpoint dict")
            return state

    return WeightsOnlyCheckpointEngine()


def load(engine, save_path: str | Path, tag_dir: Path) -> int:
    """DeepSpeed's load of an older tag (same layout only); returns the step to continue from."""
    engine.checkpoint_engine = safe_checkpoint_engine()
    path, client = engine.load_checkpoint(str(save_path), tag=tag_dir.name, load_module_strict=True)
    if path is None:
        raise LayoutError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    return int(client["step"])
