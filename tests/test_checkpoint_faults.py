"""The checkpoint format through the real CLIs: one copy of each thing (<= 14 B/param), every file
hashed while written and checked before it is read, damaged files refused by name (resume,
pp_to_hg, `convert_model.py verify`), pickled objects refused rather than run, older tags
(DeepSpeed's own files, no hashes) still resumed, and pp_to_hg exporting in the source's dtype.

One short training run (fp32, from a bf16 HF model) is shared by every case; each case damages
its own copy of the checkpoint dir. Resume cases run `python train_ds.py` as subprocesses, two
at a time; they fail while checking the tag, before anything is built."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import EXAMPLE_DATA, run_main
from tests.dist import free_port, run_ranks
from tests.test_train import config

ROOT = Path(__file__).resolve().parent.parent
LAYER = "layer_02-model_states.pt"


def cli(script: str, *args, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **(env or {})}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)


def write_config(pp: Path, save: Path, steps: int) -> Path:
    path = Path(str(save) + ".yml")
    raw = config(pp, save, dims=(1, 1), parts=(6,), steps=steps, save_every_steps=2)
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A bf16 HF model, converted, trained 4 steps in fp32 (tags global_step2, global_step4)."""
    from transformers import AutoModelForCausalLM

    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model, sample_texts

    root = tmp_path_factory.mktemp("faults")
    hf = make_tiny_hf_model(root / "hf", "llama", sample_texts(EXAMPLE_DATA))
    AutoModelForCausalLM.from_pretrained(hf).to(torch.bfloat16).save_pretrained(hf)
    pp = hf_to_pp(hf, root / "pp")
    run = cli("train_ds.py", "--config", write_config(pp, root / "run", 4))
    assert run.returncode == 0, run.stderr[-3000:]
    return {"root": root, "pp": pp, "save": root / "run", "log": run.stdout + run.stderr}


def copy_run(base, name: str) -> Path:
    dst = base["root"] / name
    shutil.copytree(base["save"], dst)
    return dst


def meta_of(tag: Path) -> dict:
    return json.loads((tag / "meta.json").read_text())


def flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(data))


def zero_fill(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def drop_hashes(tag: Path) -> None:
    """What a tag written before checksums looks like: sizes only."""
    meta = meta_of(tag)
    meta.pop("hashes"), meta.pop("hash")
    (tag / "meta.json").write_text(json.dumps(meta))


class Payload:
    """Unpickled without weights_only this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle(tag: Path, rel: str, marker: Path) -> None:
    """Replace a file by a pickled object and record its size and hash, as an attacker would."""
    from engine.checkpoints import integrity

    torch.save({"state": Payload(marker)}, tag / rel)
    meta = meta_of(tag)
    meta["files"][rel] = (tag / rel).stat().st_size
    if "hashes" in meta:
        meta["hashes"][rel] = integrity.hash_file(tag / rel, meta["hash"])
    (tag / "meta.json").write_text(json.dumps(meta))


def plant(tag: Path, rel: str, obj) -> None:
    """Replace a file by another torch.save (no pickled code: weights-only loads it) and record its
    size and hash: a file of the right kind of archive with the wrong contents."""
    from engine.checkpoints import integrity

    torch.save(obj, tag / rel)
    meta = meta_of(tag)
    meta["files"][rel] = (tag / rel).stat().st_size
    if "hashes" in meta:
        meta["hashes"][rel] = integrity.hash_file(tag / rel, meta["hash"])
    (tag / "meta.json").write_text(json.dumps(meta))


def one_error_line(err: str, *expect: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------- tests
def test_lean_tag_and_export_in_the_source_dtype(base, tmp_path, capsys):
    from safetensors import safe_open

    from convert_model import main

    tag = base["save"] / "global_step4"
    meta = meta_of(tag)
    names = set(meta["files"])
    assert not any(n.startswith("mp_rank") or "optim_states" in n for n in names)  # DeepSpeed's copies are gone
    assert {"optim/common.pt", "config.yml", LAYER, "optim/layer_02.pt"} <= names
    assert set(meta["hashes"]) == names and meta["format"] == 2
    size = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    assert size / meta["n_params"] <= 14, size / meta["n_params"]  # fp32 weights + AdamW moments, once each
    assert "checkpoint global_step4: " in base["log"] and " B/param, " in base["log"]
    weights = torch.load(tag / LAYER, weights_only=True)
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    # bf16 source, trained in fp32: exported in bf16 (config.json says so too); --dtype overrides
    for flag, want, name in ((), torch.bfloat16, "bfloat16"), (("--dtype", "float32"), torch.float32, "float32"):
        out = tmp_path / name
        assert run_main(main, ["pp_to_hg", "--input-path", str(base["save"]), "--save-path", str(out), *flag],
                        capsys)[0] == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["dtype"] == cfg["torch_dtype"] == name
        for shard in out.glob("*.safetensors"):
            with safe_open(shard, "pt") as fh:
                assert {fh.get_tensor(k).dtype for k in fh.keys()} == {want}


def test_verify_command(base, tmp_path, capsys):
    from convert_model import main
    from engine.checkpoints.convert import pp_to_hg

    code, out, _ = run_main(main, ["verify", str(base["save"])], capsys)
    assert code == 0 and out.startswith("ok: ") and "global_step4" in out and "xxh3_128 checked" in out
    assert run_main(main, ["verify", str(base["save"]), "--tag", "global_step2"], capsys)[0] == 0
    cases = {"flip": (lambda t: flip_bit(t / LAYER), "checksum mismatch"),
             "zeros": (lambda t: zero_fill(t / "optim/layer_03.pt"), "checksum mismatch"),
             "short": (lambda t: truncate(t / LAYER), "bytes, the checkpoint recorded"),
             "gone": (lambda t: (t / "optim/common.pt").unlink(), "missing from checkpoint"),
             "old-zeros": (lambda t: (drop_hashes(t), zero_fill(t / LAYER)), "not a readable torch file")}
    for name, (damage, expect) in cases.items():
        save = copy_run(base, f"verify-{name}")
        damage(save / "global_step4")
        code, _, err = run_main(main, ["verify", str(save)], capsys)
        assert code == 2, name
        where = "optim/layer_03.pt" if name == "zeros" else "optim/common.pt" if name == "gone" else LAYER
        one_error_line(err, where, expect)
    # an HF dir: shard headers, sizes and the index, nothing loaded
    hf = pp_to_hg(base["save"], tmp_path / "hf", max_shard_bytes=200_000)
    code, out, _ = run_main(main, ["verify", str(hf)], capsys)
    assert code == 0 and out.startswith("ok: ") and "safetensors" in out
    shards = sorted(hf.glob("*.safetensors"))
    assert len(shards) > 1
    truncate(shards[1])
    one_error_line(run_main(main, ["verify", str(hf)], capsys)[2], shards[1].name)
    shards[1].unlink()
    one_error_line(run_main(main, ["verify", str(hf)], capsys)[2], shards[1].name, "missing")
    one_error_line(run_main(main, ["verify", str(tmp_path / "nowhere")], capsys)[2], "nowhere")


def test_pp_to_hg_refuses_damaged_layer_files(base, tmp_path, capsys):
    from convert_model import main

    cases = {"flip": (lambda t: flip_bit(t / LAYER), "checksum mismatch"),
             "short": (lambda t: truncate(t / LAYER), "bytes, the checkpoint recorded"),
             "old-zeros": (lambda t: (drop_hashes(t), zero_fill(t / LAYER)), "cannot be read")}
    for name, (damage, expect) in cases.items():
        save = copy_run(base, f"export-{name}")
        damage(save / "global_step4")
        code, _, err = run_main(main, ["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / name)],
                                capsys)
        assert code == 2 and not (tmp_path / name).exists(), name
        one_error_line(err, LAYER, expect)
    # the optimizer files are not needed to export
    save = copy_run(base, "export-no-optim")
    shutil.rmtree(save / "global_step4" / "optim")
    meta = meta_of(save / "global_step4")
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("optim/")}
    (save / "global_step4" / "meta.json").write_text(json.dumps(meta))
    assert run_main(main, ["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "ok")], capsys)[0] == 0


def _train_writing_deepspeed_files(raw):
    """Train with the previous format's save: DeepSpeed's own files + a meta.json of sizes only."""
    from engine import distributed as D
    from engine.checkpoints import tags
    from engine.checkpoints.files import write_text_atomic
    from engine.config import from_dict
    from engine.training.loop import train

    def save(engine, cfg, step, family_name, n_layers, hf_dir, kind="pipeline", log=None):
        root = Path(cfg.save_path)
        engine.save_checkpoint(str(root), tag=tags.tag_name(step), client_state={"step": step}, save_latest=False)
        tag = root / tags.tag_name(step)
        D.barrier()
        if D.rank() == 0:
            files = {str(p.relative_to(tag)): p.stat().st_size for p in sorted(tag.rglob("*")) if p.is_file()}
            meta = {"family": family_name, "n_layers": n_layers, "step": step, "files": files,
                    "layout": tags.layout_of(cfg, n_layers, kind)}
            (tag / "meta.json").write_text(json.dumps(meta))
            tags.copy_hf_side_files(hf_dir, root / "hf")
            write_text_atomic(root / "latest", tag.name)
        D.barrier()
        return tag

    tags.save = save
    return train(from_dict(raw)).losses


def test_resume_refuses_damaged_tags_and_pickles(base, tmp_path):
    """Through `python train_ds.py`: each damaged copy is refused with one line naming the file;
    a pickled object planted in a file is refused, not run; older tags (no hashes; DeepSpeed's own
    files) still resume, continuing exactly like the uninterrupted run."""
    old = base["root"] / "old-format"
    raw = config(base["pp"], old, dims=(1, 1), parts=(6,), steps=2)
    run_ranks(_train_writing_deepspeed_files, 1, raw)
    old_tag = old / "global_step2"
    assert (old_tag / "mp_rank_00_model_states.pt").is_file() and not (old_tag / "optim").exists()
    marker = tmp_path / "pwned"
    cases = {  # name: (source run, damage of its latest tag, expected error substrings or None: resumes)
        "flip": (base["save"], lambda t: flip_bit(t / LAYER), [LAYER, "checksum mismatch"]),
        "zeros": (base["save"], lambda t: zero_fill(t / LAYER), [LAYER, "checksum mismatch"]),
        "short": (base["save"], lambda t: truncate(t / "optim/layer_01.pt"), ["optim/layer_01.pt", "recorded"]),
        "pickle": (base["save"], lambda t: plant_pickle(t, "optim/common.pt", marker), ["optim/common.pt",
                                                                                      "cannot be read"]),
        "no-hashes": (base["save"], drop_hashes, None),
        "no-hashes-zeros": (base["save"], lambda t: (drop_hashes(t), zero_fill(t / LAYER)), [LAYER, "cannot be read"]),
        "ds-files": (old, lambda t: None, None),
        "ds-pickle": (old, lambda t: plant_pickle(t, "mp_rank_00_model_states.pt", marker),
                      ["mp_rank_00_model_states.pt", "cannot be read"]),
        "ds-zeros": (old, lambda t: zero_fill(t / LAYER), [LAYER, "cannot be read"]),
        # torch files holding the wrong things (recorded, so they pass the hash check): one line each
        "layer-list": (base["save"], lambda t: plant(t, LAYER, [torch.zeros(2)]), [LAYER, "holds a list"]),
        "layer-int-key": (base["save"], lambda t: plant(t, LAYER, {0: torch.zeros(2)}), [LAYER, "key 0 is an int"]),
        "optim-tensor": (base["save"], lambda t: plant(t, "optim/layer_01.pt", torch.zeros(2)),
                         ["optim/layer_01.pt", "holds a Tensor"]),
        "optim-entry-not-dict": (base["save"], lambda t: plant(t, "optim/layer_01.pt", {"embed_tokens.weight": 1.0}),
                                 ["optim/layer_01.pt", "'embed_tokens.weight' is not a parameter's state"]),
        "optim-moment-none": (base["save"], lambda t: plant(t, "optim/layer_01.pt", {"embed_tokens.weight": {
            "exp_avg": None}}), ["optim/layer_01.pt", "'exp_avg' holds None"]),
        "common-none": (base["save"], lambda t: plant(t, "optim/common.pt", None), ["optim/common.pt", "holds None"]),
        "common-no-step": (base["save"], lambda t: plant(t, "optim/common.pt", {"format": 2}),
                           ["optim/common.pt", "no 'step'"]),
        "ds-list": (old, lambda t: plant(t, "mp_rank_00_model_states.pt", [torch.zeros(2)]),
                    ["mp_rank_00_model_states.pt", "holds a list"]),
    }

    def one(name):
        src, damage, expect = cases[name]
        save = tmp_path / name
        shutil.copytree(src, save)
        damage(save / (save / "latest").read_text().strip())
        steps = 5 if src == base["save"] else 4
        return name, save, cli("train_ds.py", "--config", write_config(base["pp"], save, steps))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, cases))
    reference = losses(base["save"])
    for name, save, proc in results:
        expect = cases[name][2]
        if expect is None:
            assert proc.returncode == 0, (name, proc.stderr[-3000:])
            got = losses(save)
            last = max(got)
            if name == "ds-files":  # the older tag continues exactly like the run that never stopped
                assert [got[s] for s in (3, 4)] == [reference[3], reference[4]], (got, reference)
            else:
                assert last == 5 and "saved without checksums" in proc.stderr, name
        else:
            assert proc.returncode == 2, (name, proc.stderr[-3000:])
            one_error_line(proc.stderr, *expect)
    assert not marker.exists()  # neither pickle ran


def test_hf_to_pp_records_the_source_dtype(tiny_pp, tmp_path):
    """A config.json that names no dtype gets the source tensors' one at conversion, for pp_to_hg."""
    from engine.checkpoints.convert import hf_to_pp

    hf = tmp_path / "hf"
    shutil.copytree(Path(tiny_pp).parent / "hf", hf)
    cfg = json.loads((hf / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (hf / "config.json").write_text(json.dumps(cfg))
    out = hf_to_pp(hf, tmp_path / "pp")
    assert json.loads((out / "hf" / "config.json").read_text())["torch_dtype"] == "float32"


# ------------------------------------------------- pipeline dirs as other tools / hands leave them
def _rename_layers(tag: Path, infix: str) -> None:
    for f in sorted(tag.glob("layer_*-model_states.pt")):
        f.rename(f.with_name(f.name.replace("-model_states", f"-{infix}-model_states")))


def _replace_by_link(path: Path, target: Path) -> None:
    shutil.move(path, target)
    path.symlink_to(target)


PP_CASES = {  # name: (damage of a copy of tiny_pp, None: exports the same weights / substrings of the one error line)
    "latest-crlf": (lambda d: (d / "latest").write_bytes(b"global_step0\r\n"), None),
    "latest-spaces": (lambda d: (d / "latest").write_bytes(b"  global_step0 \n\n"), None),
    "latest-bom": (lambda d: (d / "latest").write_bytes(b"\xef\xbb\xbfglobal_step0\r\n"), None),
    "latest-utf16": (lambda d: (d / "latest").write_text("global_step0", encoding="utf-16"),
                     ["latest: not a text file naming a checkpoint tag"]),
    "latest-empty": (lambda d: (d / "latest").write_text(""), ["latest: 'latest' names ''"]),
    "latest-a-dir": (lambda d: ((d / "latest").unlink(), (d / "latest").mkdir()), ["latest: should be a file"]),
    "tag-renamed": (lambda d: (d / "global_step0").rename(d / "global_step0.bak"),
                    ["global_step0: checkpoint tag named by 'latest' does not exist; tags here: global_step0.bak"]),
    "meta-json-missing": (lambda d: None, None),  # hf_to_pp's tag has none: sizes/hashes are not required
    "layer-symlink": (lambda d: _replace_by_link(d / "global_step0" / LAYER, d.parent / f"{d.name}-moved.pt"), None),
    "layer-dangling-symlink": (lambda d: (d / "global_step0" / LAYER).unlink() or
                               (d / "global_step0" / LAYER).symlink_to(d / "nowhere.pt"),
                               [LAYER, "layer file is a broken symlink"]),
    "layer-a-dir": (lambda d: (d / "global_step0" / LAYER).unlink() or (d / "global_step0" / LAYER).mkdir(),
                    [LAYER, "layer file is not a file"]),
    # Megatron-DeepSpeed's topology has a model axis: DeepSpeed names the files layer_XX-model_00-...
    "deepspeed-model-axis": (lambda d: _rename_layers(d / "global_step0", "model_00"), None),
    "deepspeed-tensor-parallel": (lambda d: (_rename_layers(d / "global_step0", "model_00"), shutil.copy(
        d / "global_step0" / "layer_00-model_00-model_states.pt", d / "global_step0" / "layer_00-model_01-model_states.pt")),
        ["a tensor-parallel checkpoint", "merge it to one model-parallel rank"]),
    "no-hf-dir": (lambda d: shutil.rmtree(d / "hf"), ["without the model's HF config (hf/config.json)"]),
    "deepspeed-non-pipeline": (lambda d: ([f.unlink() for f in (d / "global_step0").glob("layer_*")], torch.save(
        {"module": {}}, d / "global_step0" / "mp_rank_00_model_states.pt")),
        ["global_step0: a DeepSpeed checkpoint of a model trained without pipeline layers"]),
}


def test_pipeline_dirs_from_other_tools_export_or_fail_in_one_line(tiny_pp, tmp_path, capsys):
    from convert_model import main
    from engine.checkpoints.weights import open_weights

    want = open_weights(tiny_pp)
    for name, (damage, expect) in PP_CASES.items():
        src, out = tmp_path / name, tmp_path / f"{name}-hf"
        shutil.copytree(tiny_pp, src)
        damage(src)
        code, _, err = run_main(main, ["pp_to_hg", "--input-path", str(src), "--save-path", str(out)], capsys)
        if expect is None:
            assert code == 0, (name, err)
            got = open_weights(out)
            assert all(torch.equal(got.layer(i)[k], want.layer(i)[k]) for i in range(len(want)) for k in
                       want.layer(i)), name
            assert run_main(main, ["verify", str(src)], capsys)[0] == 0, name
        else:
            assert code == 2 and not out.exists(), (name, err)
            one_error_line(err, *expect)
            assert "Traceback" not in err


def test_output_disk_refusing_is_one_line_and_leaves_nothing(tiny_pp, tmp_path, capsys, monkeypatch):
    """pp_to_hg / hg_to_pp onto a full disk, a read-only one, an I/O error; an output that is a
    file, under a file, or a non-empty dir: one line, exit 2, nothing left behind."""
    from safetensors import SafetensorError

    from convert_model import main
    from engine.checkpoints import convert

    hf = Path(tiny_pp).parent / "hf"
    runs = {"pp_to_hg": ["pp_to_hg", "--input-path", str(tiny_pp)], "hg_to_pp": ["hg_to_pp", "--input-path", str(hf)]}

    def refused(out: Path, *expect: str, where: Path | None = None):
        where = where or out.parent
        before = sorted(p.name for p in where.iterdir())
        for direction, argv in runs.items():
            code, _, err = run_main(main, [*argv, "--save-path", str(out)], capsys)
            assert code == 2 and "Traceback" not in err, (direction, err)
            one_error_line(err, *expect)
            assert sorted(p.name for p in where.iterdir()) == before, (direction, list(where.iterdir()))

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    refused(tmp_path / "a-file", "a-file: output already exists")
    refused(tmp_path / "a-file" / "sub", "a-file is a file, not a directory", where=tmp_path)
    refused(tmp_path / "full", "full: output already exists")
    assert (tmp_path / "a-file").read_text() == "x" and os.listdir(tmp_path / "full") == ["keep.txt"]

    def io_error(*args, **kwargs):  # what safetensors raises when the disk fails mid-write
        raise SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)")

    with monkeypatch.context() as m:
        m.setattr(convert, "save_file", io_error)
        out = tmp_path / "eio" / "out"
        code, _, err = run_main(main, [*runs["pp_to_hg"], "--save-path", str(out)], capsys)
        assert code == 2 and not out.exists() and not list(out.parent.iterdir()), err
        one_error_line(err, f"{out}: input/output error while writing part-00000.safetensors", "nothing was written")

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full and read-only disk cases are not run")
    try:
        refused(disk / "out", "out: no space left on device", "nothing was written there")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        refused(disk / "out", "out: cannot create the output (read-only file system)")
    finally:
        subprocess.run(["umount", "-l", str(disk)])
