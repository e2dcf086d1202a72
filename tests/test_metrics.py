"""What users watch while training: metrics.jsonl, TensorBoard, the loss PNG, held-out eval loss.

One 2-rank pipeline run (pp=2) and one data-parallel run (dp=2) with a held-out file; the eval
loss they log is checked against a single-process reference over the same rows.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import from_dict
from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parent.parent
DATA = [str(p) for p in sorted((ROOT / "examples" / "data").glob("*.json*"))]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIELDS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
          "step_time_s", "max_mem_gib"}
EVAL_FIELDS = {"eval_loss", "eval_ppl", "eval_tokens"}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """7 samples of mixed types (not a multiple of the global batch: the last one is padded)."""
    rows = []
    for name in ("conversation.jsonl", "instruct.jsonl", "conver_has_api.jsonl"):
        rows += [json.loads(l) for l in (ROOT / "examples" / "data" / name).read_text().splitlines() if l.strip()]
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:7]))
    return path


def config(model_path, save_path, dims, parts, steps, **over) -> dict:
    raw = {"model_path": str(model_path), "data_path": DATA, "save_path": str(save_path), "max_seq_len": 64,
           "n_epochs": 50, "max_steps": steps, "packing": True, "seed": 7,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": list(dims)}, "parts": list(parts)},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}}
    raw.update(over)
    return raw


def _train(raw):
    from engine.training.loop import train

    return train(from_dict(raw)).losses


@pytest.fixture(scope="module", params=[((2, 1), (3, 3)), ((1, 2), (6,))], ids=["pp2", "dp2"])
def run(request, tiny_pp, heldout, tmp_path_factory):
    dims, parts = request.param
    save = tmp_path_factory.mktemp("run") / "ckpt"
    raw = config(tiny_pp, save, dims, parts, steps=4, eval_data_path=str(heldout), evaluate_every=2, profile_step=3)
    run_ranks(_train, 2, raw)
    return save, raw


def reference_eval_loss(ckpt_dir: Path, raw: dict) -> float:
    """Token-weighted mean CE over every held-out row, one process, no DeepSpeed."""
    from transformers import AutoTokenizer

    from data.dataset import build_dataset
    from engine.checkpoints.weights import open_weights
    from models.attention import AttnOptions
    from models.block_base import LayerOptions
    from models.pipeline import SequentialModel

    source = open_weights(ckpt_dir)
    model = SequentialModel(source.model.family, source.model.args, LayerOptions(attn=AttnOptions(packed=raw["packing"])))
    for idx, layer in model.owned_layers():
        layer.load_state_dict(source.layer(idx))
    dataset = build_dataset(raw["eval_data_path"], AutoTokenizer.from_pretrained(source.model.hf_dir), raw["max_seq_len"],
                            packing=raw["packing"], seed=raw["seed"])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            row = {k: torch.from_numpy(v)[None] for k, v in dataset[i].items()}
            logits = model(row["input_ids"], row["position_ids"])
            total += float(F.cross_entropy(logits[0].double(), row["labels"][0], ignore_index=-100, reduction="sum"))
            count += int((row["labels"] != -100).sum())
    return total / count


def test_metrics_jsonl_fields_and_eval(run):
    save, raw = run
    records = [json.loads(l) for l in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one record per step, increasing
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["max_mem_gib"] is None  # CPU run
        assert math.isfinite(r["loss"]) and r["tokens_per_s_per_gpu"] > 0 and r["lr"] >= 0
        assert (EVAL_FIELDS <= set(r)) == (r["step"] in (2, 4))  # every evaluate_every steps (and the last)
    last = records[-1]
    assert last["eval_ppl"] == pytest.approx(math.exp(last["eval_loss"]), rel=1e-9)
    assert records[1]["eval_tokens"] == last["eval_tokens"] > 0
    # the last eval ran on the weights of the final checkpoint: a single process agrees
    assert (save / "latest").read_text() == "global_step4"
    assert last["eval_loss"] == pytest.approx(reference_eval_loss(save, raw), abs=1e-5)


def test_profile_step_writes_top_ops_and_trace(run):
    import gzip

    save, _ = run
    files = sorted(p.name for p in (save / "profile").iterdir())
    assert files == ["rank0_step3.json.gz", "rank0_step3_top.txt", "rank1_step3.json.gz", "rank1_step3_top.txt"]
    lines = (save / "profile" / "rank1_step3_top.txt").read_text().splitlines()
    assert lines[0].startswith("step 3 rank 1: CPU self time ")
    shares = [float(l.split()[1].rstrip("%")) for l in lines[2:]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5
    assert any("aten::mm" in l or "aten::addmm" in l for l in lines[2:])  # the matmuls are there
    trace = json.loads(gzip.open(save / "profile" / "rank0_step3.json.gz").read())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])


def test_gpu_summary_busy_idle_and_kernels():
    from engine.training.profiling import gpu_summary

    def k(name, ts, dur, cat="kernel"):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur}

    # 0-100 gemm, 90-150 overlapping gemm, gap 30 us, 180-200 copy, gap 2000 us, 2200-2300 gemm; a CPU op ignored
    events = [k("gemm", 0, 100), k("gemm", 90, 60), k("h2d", 180, 20, "gpu_memcpy"), k("gemm", 2200, 100),
              k("aten::mm", 0, 5000, "cpu_op")]
    lines = gpu_summary(events, rows=5)
    assert lines[0] == ("GPU span 0.002 s, busy 11.7%, idle 2.0 ms (gaps <50 us: 0.0 ms, 50 us-1 ms: 0.0 ms, "
                        ">1 ms: 2.0 ms)")  # busy 150 + 20 + 100 of 2300 us; gaps 30 + 2000 us
    assert lines[2].split() == ["0.000", "11.3%", "3", "gemm"] and lines[3].split()[-1] == "h2d"
    assert gpu_summary([k("x", 0, 1, "cpu_op")], rows=5) == ["no GPU activity recorded"]


def test_loss_png_and_plot_command(run, tmp_path):
    from PIL import Image

    save, _ = run
    png = save / "loss.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as im:
        im.verify()
    out = tmp_path / "redrawn.png"
    proc = subprocess.run([sys.executable, "train_ds.py", "plot", str(save), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(out), proc.stderr
    assert "note:" not in proc.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[2] in (3, 4)


def test_tensorboard_scalars(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save, _ = run
    acc = EventAccumulator(str(save / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s_per_gpu", "train/mfu",
            "eval/loss", "eval/ppl"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]


def test_plot_from_metrics_file(tmp_path):
    from engine.training.metrics import main

    records = [{"step": s, "loss": 3 - 0.1 * s, "lr": 1e-3, "lm_loss": 2.9 - 0.1 * s} for s in range(1, 6)]
    records[2]["eval_loss"] = 2.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


def test_plot_command_spellings_and_bad_input(tmp_path, capsys):
    """The stable spelling (train_ds.py / train_ds_zero.py plot) and the two earlier module paths,
    which still work and name the stable one in a note; bad input is one error line."""
    import train_ds
    import train_ds_zero
    from engine.training.metrics import main, plot_command

    records = [{"step": s, "loss": 3 - 0.1 * s, "lr": 1e-3} for s in range(1, 4)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')  # a line being written
    for i, script in enumerate((train_ds, train_ds_zero)):
        with pytest.raises(SystemExit) as e:
            script.main(["plot", str(tmp_path), "--out", str(tmp_path / f"{i}.png")])
        assert e.value.code == 0 and (tmp_path / f"{i}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "note:" not in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ("note: 'python -m engine.training.metrics plot' is now 'python train_ds.py "
                                       "plot' (the same arguments)\n")
    proc = subprocess.run([sys.executable, "-m", "engine.metrics", "plot", str(tmp_path), "--out",
                           str(tmp_path / "old.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "old.png").read_bytes()[:8] == PNG_SIGNATURE, proc.stderr
    assert "note: 'python -m engine.metrics plot' is now 'python train_ds.py plot'" in proc.stderr

    def one_error(argv, *expect):
        try:
            code = plot_command(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert all(x in err for x in expect), err

    one_error([str(tmp_path / "nowhere")], "nowhere", "no metrics file")
    one_error([], "save_path")
    one_error([str(tmp_path), "--out", str(tmp_path / "no" / "dir.png")], "dir.png", "directory does not exist")
    metrics.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    one_error([str(tmp_path)], f"{metrics}: line 2: not JSON")
    metrics.write_text('[1, 2]\n{"step": 2}\n')
    one_error([str(tmp_path)], f"{metrics}: line 1: not a JSON object")


def test_verbose_flag_switches_what_the_env_switches(monkeypatch):
    from engine.cli import config_parser, parse_config
    from engine.training.metrics import verbose

    monkeypatch.delenv("PPLLM_VERBOSE", raising=False)
    parse_config(config_parser("t"), ["--config", str(ROOT / "configs/tiny_llama_cpu.yml")])
    assert not verbose()
    parse_config(config_parser("t"), ["--config", str(ROOT / "configs/tiny_llama_cpu.yml"), "--verbose"])
    assert verbose()


def test_quiet_prints_keep_deepspeed_warnings(capsys, monkeypatch):
    from deepspeed.utils import logger

    from engine.training.metrics import quiet_prints, setup_logging

    monkeypatch.delenv("PPLLM_VERBOSE", raising=False)
    level = logger.level
    try:
        setup_logging()
        with quiet_prints():
            print("SEED_LAYERS=True BASE_SEED=7")
            logger.info("chatter")
            logger.warning("a real warning")
        out = capsys.readouterr()
        text = out.out + out.err
        assert "SEED_LAYERS" not in text and "chatter" not in text
    finally:
        logger.setLevel(level)


def test_eval_batches_pad_and_scale():
    import numpy as np

    from engine.training.evaluate import EvalBatches

    class Rows:  # 5 rows of 4 tokens; row i has i + 1 loss tokens
        max_seq_len, pad_id = 4, 0
        n_loss_tokens = np.arange(1, 6)

        def __len__(self):
            return 5

        def __getitem__(self, i):
            labels = np.full(4, -100)
            labels[:i + 1 if i < 4 else 4] = 7
            return {"input_ids": np.full(4, i + 1), "labels": labels, "position_ids": np.arange(4)}

    seen = []
    for rank in range(2):
        b = EvalBatches(Rows(), 1, 2, rank, 2)
        assert b.n_steps == 2 and b.n_loss_tokens == 15 and float(b.scale) == pytest.approx(4 / 15)
        for step in range(b.n_steps):
            for (ids, _), (labels, _) in b.micro_batches(step):
                seen.append(int(ids[0, 0]))
    assert sorted(seen) == [0, 0, 0, 1, 2, 3, 4, 5]  # every row once, three empty pad rows


def test_demo_on_the_trained_checkpoint(run, tmp_path):
    """Greedy answers of the trained model: straight from the pipeline checkpoint = transformers
    generate() on its pp_to_hg export, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.checkpoints.convert import pp_to_hg
    from engine.inference.generate import SamplingConfig, generate, load_lm, prompt_ids

    save, _ = run
    hf = pp_to_hg(save, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(hf)
    lm = load_lm(save)
    ref = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = prompt_ids({"type": "conversation", "rounds": [["ask", "Hello"]]}, tok)
    got = generate(lm, tok, ids, SamplingConfig(max_new_tokens=10))
    want = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert got.ids and got.ids == want.tolist()[:len(got.ids)]
