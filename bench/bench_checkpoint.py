"""Checkpoint save/load time against the disk's own write speed, for a model of any size.

    python bench/bench_checkpoint.py --dir /tmp/ckpt-bench                       # 34M params, CPU, a minute
    python bench/bench_checkpoint.py --preset medium --repeat 5 --dir /tmp/ckpt-bench   # 187M params, CPU
    python bench/bench_checkpoint.py --preset 7b --layers 16 --dtype bf16 --dir /nvme/ckpt-bench   # one H200
    deepspeed --num_gpus 8 bench/bench_checkpoint.py --preset 7b --dtype bf16 --pp 8 --dir /nvme/ckpt-bench

Builds a random llama of the given shape (no weights are read: from_scratch), runs one training
step so the optimizer state exists, then, `--repeat` times each, alternating:
  save          engine/checkpoints/tags.save (the real one: layer files + optim/ + meta, fsync, publish)
  save, no hash the same with each file written by a plain torch.save(obj, path) (the format
                before checksums: no hash, torch's own zip CRC-32 on): what checksums cost
  disk write    the same number of bytes, in files of the same sizes, written by each rank in parallel
                from a buffer with os.write, then fsynced (what the disk allows)
and once: verify (size + hash of every file, as resume does first) and load (layer files into the
model, fp32 masters + optimizer state into the engine). Prints one table on rank 0.
`--layers` cuts the 7B shape to fit one GPU: 7B bf16 + AdamW state is ~16 B/param in memory.

It fits the disk it runs on: one tag (~12 B/param: fp32 master + two AdamW moments) is on the
disk at a time (the previous one is removed before each save and before the raw write, which
writes a tag's worth), and before anything is built the free space under --dir is checked: when a
tag of the asked-for layers would not fit in 85% of it, fewer layers are measured, and the
first line printed says so (`disk: ...`). No layer count fitting is an error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
           "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                          num_key_value_heads=16, vocab_size=16000),
           "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000)}


def _sync(flush: bool = False):
    """Barrier; with flush, first write back everything dirty (others' and ours): each timing
    starts from a quiet disk instead of paying for the previous one's write-back."""
    from engine import distributed as D

    if flush:
        os.sync()
    D.barrier()


TAG_BYTES_PER_PARAM = 12  # fp32 master + AdamW's two moments, whatever the training dtype (README, Checkpoints)
DISK_SHARE = 0.85  # of the free space: the rest stays for whoever else writes there


def llama_params(shape: dict, layers: int) -> int:
    """Parameters of the llama `shape` with `layers` blocks (untied embedding and head)."""
    h, ffn, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h
    return 2 * vocab * h + h + layers * block


def free_bytes(path: Path) -> int:
    """Free space on the filesystem `path` is (or will be) on."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def fit_layers(shape: dict, want: int, free: int) -> tuple[int, str]:
    """The most blocks (<= want) whose tag fits DISK_SHARE of `free` bytes, and the line saying so."""
    budget = DISK_SHARE * free
    need = lambda n: TAG_BYTES_PER_PARAM * llama_params(shape, n)
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    fits = want
    while fits > 0 and need(fits) > budget:
        fits -= 1
    if fits == want:
        return want, (f"disk: {gib(free)} free; one tag of {want} layers ~{gib(need(want))} "
                      f"({TAG_BYTES_PER_PARAM} B/param), one tag on the disk at a time: fits")
    if fits == 0:
        raise SystemExit(f"error: disk: {gib(free)} free; even one layer's tag (~{gib(need(1))}) does not fit in "
                         f"{DISK_SHARE:.0%} of it: free space or pick another --dir")
    return fits, (f"disk: {gib(free)} free; one tag of {want} layers would be ~{gib(need(want))} "
                  f"({TAG_BYTES_PER_PARAM} B/param), more than {DISK_SHARE:.0%} of it: measuring {fits} layers "
                  f"instead (~{gib(need(fits))} per tag, one tag on the disk at a time)")


def disk_write(out: Path, sizes: list[int]) -> float:
    """Seconds to write files of these sizes from memory, then fsync them (as a save does: write
    everything, then flush the tree), every rank its own share, in parallel."""
    buf = memoryview(os.urandom(64 * 2**20))  # not zeros: some virtual disks write zeros at another speed
    out.mkdir(parents=True, exist_ok=True)
    _sync(flush=True)
    t0 = time.perf_counter()
    for i, size in enumerate(sizes):
        fd = os.open(out / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left:
                left -= os.write(fd, buf[:min(left, len(buf))])
        finally:
            os.close(fd)
    for i in range(len(sizes)):
        fd = os.open(out / f"f{i}", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    _sync()
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of blocks")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: all ranks)")
    p.add_argument("--dir", required=True, help="scratch dir on the disk to measure (removed at the end)")
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)

    import torch

    from engine import distributed as D
    from engine.checkpoints import integrity, reshape
    from engine.checkpoints import tags as ckpt
    from engine.checkpoints.weights import load_stage
    from engine.config import from_dict
    from engine.model import Model
    from engine.training.backends import PipelineBackend
    from engine.training.loop import build_data
    from models import llama
    from models.tiny import make_tiny_tokenizer, sample_texts

    D.init_distributed()
    rank, world = D.rank(), D.world_size()
    work = Path(a.dir)
    shape = dict(PRESETS[a.preset])
    if a.layers:
        shape["num_hidden_layers"] = a.layers
    # every rank decides from the same number: rank 0's reading of the disk (nothing written yet)
    free = free_bytes(work) if rank == 0 else 0
    if world > 1:
        import torch.distributed as dist

        t = D.comm_tensor([free])
        dist.broadcast(t, 0)
        free = int(t[0].item())
    shape["num_hidden_layers"], line = fit_layers(shape, shape["num_hidden_layers"], free)
    if rank == 0:
        print(line, flush=True)
    model_dir = work / "model"
    data = sorted(str(f) for f in (ROOT / "examples" / "data").glob("*.json*"))
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps(llama.tiny_hf_config(**shape, max_position_embeddings=4096)))
        make_tiny_tokenizer(model_dir, sample_texts(data))
    _sync()
    pp = a.pp or world
    n_layers = shape["num_hidden_layers"] + 2
    raw = {"model_path": str(model_dir), "data_path": data, "save_path": str(work / "run"), "max_seq_len": 128,
           "n_epochs": 50, "max_steps": 1, "packing": True, "seed": 1, "from_scratch": True,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [pp, world // pp]}, "parts": "auto"},
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": pp,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    if a.dtype == "bf16":
        raw["bf16"] = {"enabled": True}
    cfg = from_dict(raw)
    model = Model.from_dir(model_dir)
    backend = PipelineBackend(cfg, model)
    engine = backend.build("scratch")
    _, loader = build_data(cfg, model, backend.dp_rank, backend.dp_size)
    backend.train_step(loader.micro_batches(0))  # the optimizer state exists from here on

    real_save = integrity.save

    def plain_save(obj, path, algo=None):
        torch.save(obj, path)
        return path.stat().st_size, ""
    rows: dict[str, list[float]] = {"save": [], "save, no hash": [], "disk write": []}
    step = 0
    tag_bytes, mine = 0, []

    def drop_tags():
        """One tag on the disk at a time: the previous one goes before the next write of a tag's size."""
        if rank == 0:
            for old in (work / "run").glob("global_step*"):
                shutil.rmtree(old)
            (work / "run" / "latest").unlink(missing_ok=True)
        _sync()

    kinds = ["save, no hash", "save", "disk write"]
    for r in range(a.repeat):
        for what in kinds[r % 3:] + kinds[:r % 3]:  # each in every position: the disk's state varies
            drop_tags()
            if what == "disk write":
                if tag_bytes:
                    rows[what].append(disk_write(work / f"raw-{rank}", mine))
                continue
            integrity.save = real_save if what == "save" else plain_save
            step += 1
            _sync(flush=True)
            t0 = time.perf_counter()
            tag = ckpt.save(engine, cfg, step, model.name, n_layers, model_dir, log=lambda _: None)
            rows[what].append(time.perf_counter() - t0)
            integrity.save = real_save
            meta = json.loads((tag / "meta.json").read_text())
            tag_bytes = sum(meta["files"].values())
            mine = [meta["files"][rel] for rel in sorted(meta["files"])][rank::world]  # a share of the same sizes
    if not tag.is_dir() or not meta.get("hashes") or not all(meta["hashes"].values()):  # verify: a hashed tag
        drop_tags()
        step += 1
        tag = ckpt.save(engine, cfg, step, model.name, n_layers, model_dir, log=lambda _: None)
    # load: what resume does (check every file, weights from layer files, masters + optimizer state)
    meta = json.loads((tag / "meta.json").read_text())
    _sync(flush=True)
    t0 = time.perf_counter()
    integrity.verify(tag, meta, sorted(meta["files"])[rank::world])
    _sync()
    t_verify = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_stage(engine.module, work / "run", model)
    reshape.load(engine, tag)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    _sync()
    t_load = time.perf_counter() - t0
    if rank == 0:
        gb = tag_bytes / 1e9
        best = {k: min(v) for k, v in rows.items()}  # the least disturbed run of each (shared disks are noisy)
        print(f"model: llama {shape}, {meta['n_params'] / 1e9:.3f}B params, {a.dtype}, {world} rank(s), pp {pp}")
        print(f"tag: {gb:.2f} GB, {tag_bytes / meta['n_params']:.2f} B/param, {len(meta['files'])} files")
        print(f"{'':16}{'best s':>8}{'GB/s':>7}{'median s':>10}   all runs")
        for k, v in rows.items():
            print(f"{k:16}{best[k]:8.2f}{gb / best[k]:7.2f}{statistics.median(v):10.2f}   "
                  f"{', '.join(f'{x:.2f}' for x in v)}")
        print(f"{'verify':16}{t_verify:8.2f}{gb / t_verify:7.2f}")
        print(f"{'load':16}{t_load:8.2f}{gb / t_load:7.2f}   (layer files + masters + optimizer state)")
        print(f"best save / best disk write: {best['save'] / best['disk write']:.2f}x; checksums change a save by "
              f"{100 * (best['save'] / best['save, no hash'] - 1):+.1f}% (best runs)")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
