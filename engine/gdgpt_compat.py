"""gdGPT's config keys that are neither ours nor DeepSpeed's: mapped or dropped, each with a note.

gdGPT (github.com/CoinCheung/gdGPT) ran a fork of DeepSpeed that read a few extra keys; its
configs (configs/ds_config_pp.yml, ds_config_zero.yml and the early JSON files) load here with
only paths changed. Nothing DeepSpeed would reject may reach it, so such keys are rewritten on
the raw dict before parsing and each rewrite is reported in one line (`--dry-run` and rank 0's
start show them). Keys gdGPT shares with us (aux_max_z_loss, optimizer.no_wd_kws, n_epoches,
model_topo, ...) are implemented where they act, not here.
"""
from __future__ import annotations


def map_gdgpt_keys(raw: dict) -> list[str]:
    """Rewrite gdGPT-only keys of a raw config dict in place; return one note per rewrite."""
    notes = []
    fp16 = raw.get("fp16")
    if isinstance(fp16, dict) and "fused_optimizer" in fp16:
        value = str(fp16.pop("fused_optimizer")).lower()
        notes.append(f"fp16.fused_optimizer: {value} dropped (a key of gdGPT's DeepSpeed fork, unknown to DeepSpeed): "
                     "with our torch optimizer DeepSpeed always runs its unfused fp16 optimizer, which is what "
                     "fused_optimizer: false chose")
    topo = raw.get("model_topo")
    grid = topo.get("process_topology") if isinstance(topo, dict) else None
    if isinstance(grid, dict) and "axis" in grid and "axes" not in grid:
        grid["axes"] = grid.pop("axis")
        notes.append("model_topo.process_topology.axis read as 'axes' (the spelling of gdGPT's early JSON configs)")
    if "compression_training" in raw:
        raw.pop("compression_training")
        notes.append("compression_training dropped: deepspeed.initialize does not apply it (gdGPT's QAT switch that "
                     "did, use_qat, was off in all its configs)")
    return notes
