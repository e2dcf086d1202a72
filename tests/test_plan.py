"""engine/plan.py: `parts: auto` from the cost model, the memory estimate against counted bytes
of a real CPU step, the --dry-run CLI, and the one-command fine-tune (--export-hf)."""
import json
from pathlib import Path

import pytest
import torch

from engine.plan import GiB, Setup, auto_parts, estimate, layer_costs
from models import get_family

LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=4096)
BLOOM_176B = dict(model_type="bloom", vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112,
                  layer_norm_epsilon=1e-5)


def _plan(family, hf, **setup):
    fam = get_family(family)
    args = fam.Args.from_hf_config(hf)
    s = Setup(**setup)
    return layer_costs(fam, args, s), s


def test_auto_parts_llama_7b_pp8_beats_or_matches_gdgpt_layout():
    costs, s = _plan("llama", LLAMA_7B, seq=2048, micro=1, n_micro=16, pp=8, zero=1, compiled=True)
    parts = auto_parts(costs, s, 80 * GiB)
    slowest = lambda p: max(e.time for e in estimate(costs, p, s))  # noqa: E731
    assert sum(parts) == 34 and len(parts) == 8
    assert slowest(parts) <= slowest([5, 4, 4, 4, 4, 4, 4, 5]) * 1.0001
    blocks = [e.blocks for e in estimate(costs, parts, s)]
    assert blocks[-1] <= min(blocks[1:-1]) and blocks[0] <= min(blocks[1:-1])


def test_auto_parts_gives_the_first_stage_fewer_blocks_when_its_activations_bind():
    # long rows, no recompute: stage 0 keeps 8 micro-batches in flight, stage 7 one
    costs, s = _plan("llama", LLAMA_7B, seq=4096, micro=1, n_micro=16, pp=8, zero=1, compiled=True)
    fast = estimate(costs, auto_parts(costs, s), s)
    budget = fast[0].peak - 1 * GiB  # the time-optimal split does not fit on stage 0
    parts = auto_parts(costs, s, budget)
    chosen = estimate(costs, parts, s)
    assert all(e.peak <= budget for e in chosen), [e.peak / GiB for e in chosen]
    assert chosen[0].blocks < max(e.blocks for e in chosen[1:-1])


def test_auto_parts_bloom_big_vocab_head_gets_fewer_blocks():
    costs, s = _plan("bloom", BLOOM_176B, seq=2048, micro=1, n_micro=16, pp=8, zero=1)
    assert costs[-1].flops > costs[1].flops  # the 250k-vocab head costs more than a block
    blocks = [e.blocks for e in estimate(costs, auto_parts(costs, s), s)]
    assert blocks[-1] < min(blocks[1:-1]), blocks


@pytest.mark.parametrize("family, micro, seq", [("llama", 2, 64), ("llama", 1, 128), ("mixtral", 2, 64)])
def test_memory_estimate_matches_counted_bytes(family, micro, seq):
    """One fp32 AdamW step of the whole tiny model on CPU: parameters, grads, optimizer states and
    the tensors autograd saves for backward (+ the logits, whose gradient coexists with them)
    counted byte by byte; the estimate must be within 15%."""
    from models.attention import AttnOptions
    from models.block_base import LayerOptions
    from models.pipeline import SequentialModel, make_loss

    fam = get_family(family)
    hf = fam.tiny_hf_config()
    args = fam.Args.from_hf_config(hf)
    torch.manual_seed(0)
    model = SequentialModel(fam, args, LayerOptions(attn=AttnOptions(impl="sdpa")))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type == "cpu":
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    ids = torch.randint(3, args.vocab_size, (micro, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        loss = make_loss(fam, args)(logits, (ids, torch.tensor(1.0 / ids.numel())))
    loss.backward()
    out = logits[0] if isinstance(logits, tuple) else logits
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    count = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    measured = (count(model.parameters()) + count(p.grad for p in model.parameters())
                + count(v for st in opt.state.values() for v in st.values() if v.dim() > 0)
                + sum(saved.values()) + out.numel() * out.element_size())
    costs, s = _plan(family, hf, seq=seq, micro=micro, n_micro=1, pp=1, dtype="fp32", zero=0, flash=True, gpu=False)
    (est,) = estimate(costs, [len(costs)], s)
    assert abs(est.peak - measured) / measured < 0.15, (est.peak, measured, est)


def _dry(tmp_path, *extra):
    import subprocess
    import sys

    from models import get_family as gf

    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(gf("llama").tiny_hf_config()))
    root = Path(__file__).resolve().parent.parent
    data = sorted((root / "examples" / "data").glob("*.json*"))[0]
    cmd = [sys.executable, str(root / "train_ds.py"), "--config", str(root / "configs" / "llama_7b_pp.yml"),
           "--dry-run", "--set", f"model_path={hf}", "--set", f"data_path={data}", "--set", "model_topo.parts=auto",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=60)


def test_dry_run_cli(tmp_path):
    ok = _dry(tmp_path, "--world-size", "8", "--set", "model_topo.process_topology.dims=[4,2]",
              "--gpu-mem-gib", "0.0001")
    assert ok.returncode == 0, ok.stderr
    assert "pp 4 x dp 2" in ok.stdout and "bubble" in ok.stdout and "WARNING: stage 0" in ok.stdout
    assert len([l for l in ok.stdout.splitlines() if l.strip()[:1].isdigit()]) == 4
    bad = _dry(tmp_path, "--world-size", "4")
    assert bad.returncode == 2 and "needs 8 processes but 4" in bad.stderr


def _finetune(raw, out):
    from engine.config import from_dict
    from engine.training.export import train_and_export
    from engine.training.loop import train

    result = train_and_export(from_dict(raw), train, out)
    return result.final_step


def test_one_command_finetune_exports_then_resumes_to_a_skip(tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.training.export import EXPORT_MARKER
    from models.tiny import make_tiny_hf_model, sample_texts
    from tests.dist import run_ranks
    from tests.test_train import DATA, config

    hf = make_tiny_hf_model(tmp_path / "hf", "llama", sample_texts(DATA))
    raw, out = config(hf, tmp_path / "run", parts=None, steps=2), tmp_path / "out"
    assert run_ranks(_finetune, 2, raw, str(out)) == [2, 2]
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["tag"] == "global_step2"
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    stamp = (out / "config.json").stat().st_mtime_ns
    assert run_ranks(_finetune, 2, raw, str(out)) == [2, 2]  # finished: resume is a no-op, export skipped
    assert (out / "config.json").stat().st_mtime_ns == stamp


def test_resolve_auto_parts_returns_the_split_and_leaves_cfg_alone(tiny_pp):
    from engine.config import from_dict
    from engine.model import Model
    from engine.plan import resolve_auto_parts

    model = Model.from_dir(tiny_pp)
    raw = {"model_path": str(tiny_pp), "data_path": ["x.jsonl"], "save_path": "run", "train_micro_batch_size_per_gpu": 1,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"}}
    cfg, said = from_dict(raw), []
    parts = resolve_auto_parts(cfg, model, log=said.append)
    assert cfg.model_topo.parts == "auto" and len(parts) == 2 and sum(parts) == model.n_layers and said
    assert resolve_auto_parts(cfg, model, kind="zero") == "auto"


def test_family_efficiency_scales_block_time_only(monkeypatch):
    """FAMILY_EFFICIENCY (measured MFU / llama's): every family has an entry, llama is the 1.0
    baseline; a family's blocks cost FLOPs / efficiency, its embedding and head do not change, and
    the dry run's throughput estimate follows (stage time and tok/s)."""
    from engine import plan
    from models import family_names

    assert set(plan.FAMILY_EFFICIENCY) == set(family_names()) and plan.FAMILY_EFFICIENCY["llama"] == 1.0
    base, s = _plan("llama", LLAMA_7B, seq=2048, micro=1, n_micro=16, pp=2)
    monkeypatch.setitem(plan.FAMILY_EFFICIENCY, "llama", 0.5)
    slow, _ = _plan("llama", LLAMA_7B, seq=2048, micro=1, n_micro=16, pp=2)
    for a, b in zip(base, slow):
        assert b.flops == pytest.approx(a.flops * (2.0 if a.kind == "block" else 1.0))
    parts = [17, 17]
    rate = plan.tokens_per_s_per_gpu(estimate(base, parts, s), s)
    assert plan.tokens_per_s_per_gpu(estimate(slow, parts, s), s) == pytest.approx(rate / 2, rel=0.02)
    assert 5_000 < rate < 30_000  # llama-7B at pp=2 on H100/H200: ~12.8k measured (bench/README.md)


def test_measured_family_efficiency_drives_the_dry_run(monkeypatch):
    """FAMILY_EFFICIENCY holds issue 32's measured MFU / llama (H100): the dry run's throughput line
    and tok/s and `parts: auto` use it. A mixtral with a 128k vocabulary at pp=2: its slower blocks
    (0.698) weigh more against the head, so the split differs from the one at efficiency 1.0."""
    from engine import plan
    from engine.config import from_dict

    assert plan.FAMILY_EFFICIENCY == {"llama": 1.0, "bloom": 0.949, "baichuan": 1.103, "chatglm": 1.037,
                                      "mixtral": 0.698}
    fam = get_family("mixtral")
    args = fam.Args.from_hf_config(dict(model_type="mixtral", vocab_size=128000, hidden_size=4096,
                                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2))
    raw = {"model_path": "m", "data_path": ["x.jsonl"], "save_path": "run", "max_seq_len": 2048,
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 16, "bf16": {"enabled": True},
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"}}
    cfg = from_dict(raw)
    text, stages = plan.report(cfg, fam, args, 2, gpu_mem_gib=1000)
    assert "parts [17, 17] (auto)" in text and "mixtral efficiency 0.70" in text
    rate = plan.tokens_per_s_per_gpu(stages, Setup.from_config(cfg))
    assert f"~{rate:,.0f} tok/s/GPU" in text
    monkeypatch.setitem(plan.FAMILY_EFFICIENCY, "mixtral", 1.0)
    text1, stages1 = plan.report(cfg, fam, args, 2, gpu_mem_gib=1000)
    assert "parts [18, 16] (auto)" in text1 and "mixtral efficiency 1.00" in text1
    assert plan.tokens_per_s_per_gpu(stages1, Setup.from_config(cfg)) > rate * 1.3
