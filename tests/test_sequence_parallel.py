"""Sequence parallelism (seq axis, DeepSpeed Ulysses all-to-all around our attention) on gloo, fp32.

attend over N = 2 and 4 ranks equals the unsharded call (outputs and q/k/v gradients) on every
mask / bias path and GQA with KV replication, eager and compiled; training at seq 2 gives the
losses and weights of the run without it, through the real launcher.
"""
from __future__ import annotations

import re

import pytest
import torch

from tests.dist import HANG_S, run_ranks  # a hang fails with every rank's stack (run_ranks, wait_group)


# ----------------------------------------------------------------------------- attend
# (name, impl, packed, heads, kv heads, alibi, window)
CASES = [
    ("sdpa-causal", "sdpa", False, 4, 4, False, None),
    ("sdpa-packed", "sdpa", True, 4, 4, False, None),
    ("sdpa-packed-gqa", "sdpa", True, 4, 2, False, None),
    ("sdpa-packed-mqa", "sdpa", True, 4, 1, False, None),
    ("sdpa-window", "sdpa", True, 4, 2, False, 5),
    ("sdpa-alibi", "sdpa", True, 4, 4, True, None),
    ("sdpa-alibi-causal", "sdpa", False, 4, 4, True, None),
    ("eager-packed-gqa", "eager", True, 4, 2, False, None),
    ("flex-packed", "flex", True, 4, 4, False, None),
    ("flex-packed-gqa", "flex", True, 4, 2, False, None),
    ("flex-alibi", "flex", True, 4, 4, True, None),
]
B, S, D = 2, 32, 16


def _inputs(h, h_kv, packed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, S, D, generator=gen)
    k = torch.randn(B, h_kv, S, D, generator=gen)
    v = torch.randn(B, h_kv, S, D, generator=gen)
    w = torch.randn(B, S, h * D, generator=gen)  # the loss: sum(out * w), gradients of every element
    if packed:  # documents of 7, 12, 13 / 20, 12 tokens: boundaries inside and across rank slices
        pos = torch.cat([torch.cat([torch.arange(n) for n in lens])[None] for lens in ((7, 12, 13), (20, 12))])
    else:
        pos = torch.arange(S).expand(B, S)
    return q, k, v, w, pos


COMPILED = ("sdpa-packed-gqa",)  # also run under torch.compile (AOTAutograd traces the backward)


def _attend_cases(seq, compiled):
    from types import SimpleNamespace

    from models import attention, masks, positions
    from models.sequence_parallel import make_group

    blocks = SimpleNamespace(AttnOptions=attention.AttnOptions, attend=attention.attend, attention_mask=masks.attention_mask,
                             alibi_bias=positions.alibi_bias, alibi_slopes=positions.alibi_slopes)

    n = seq.size
    sl = slice(seq.rank * S // n, (seq.rank + 1) * S // n)
    out = {}
    for name, impl, packed, h, h_kv, alibi, window in CASES:
        if compiled and name not in COMPILED or impl == "flex" and n > 2:  # flex: forward only on CPU, slow
            continue
        q, k, v, w, pos = _inputs(h, h_kv, packed)
        opts = blocks.AttnOptions(packed=packed, impl=impl)
        bias_of = (lambda p: blocks.alibi_bias(blocks.alibi_slopes(h), p)) if alibi else (lambda p: None)
        grad = impl != "flex"  # FlexAttention has no backward on CPU: its gradients are a GPU step's
        # the reference: the whole row on one rank
        ref = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        full = blocks.attend(*ref, blocks.attention_mask(pos, opts, window), opts, bias=bias_of(pos))
        if grad:
            (full * w).sum().backward()
        # sharded: my slice of the tokens; the mask from the whole row's positions (gathered)
        sopts = blocks.AttnOptions(packed=packed, impl=impl, seq=seq)
        mine = [t[:, :, sl].clone().requires_grad_(grad) for t in (q, k, v)]
        local_pos = pos[:, sl].clone()

        def run(q_, k_, v_, mask_, bias_):
            return blocks.attend(q_, k_, v_, mask_, sopts, bias=bias_)

        fn = torch.compile(run, backend="aot_eager", fullgraph=True, dynamic=False) if compiled else run
        mask = blocks.attention_mask(local_pos, sopts, window)
        part = fn(*mine, mask, bias_of(local_pos))
        out[name] = {"out": (part - full[:, sl]).abs().max().item(), "scale": full.abs().max().item()}
        if grad:
            (part * w[:, sl]).sum().backward()
            out[name].update({f"d{x}": (m.grad - r.grad[:, :, sl]).abs().max().item() for x, m, r in zip("qkv", mine, ref)},
                             grad_norm=min(float(m.grad.norm()) for m in mine))
    return out


# ----------------------------------------------------------------------------- every family
FAMILY_CASES = [  # (family, hf config overrides, seq sizes)
    ("llama", {}, (2,)),  # GQA 4/2, linear rope scaling
    ("bloom", {}, (2,)),  # ALiBi, 6 heads, head dim 8 (SDPA)
    ("baichuan", {"position_embedding": "alibi"}, (2,)),  # ALiBi on W_pack
    ("chatglm", {}, (2, 4)),  # 2 KV groups (seq 4: repeated), partial interleaved rotary
    ("mixtral", {"sliding_window": 20}, (2,)),  # router aux + z-loss over the seq group, sliding window
]
FS = 32  # tokens per row


def _family_batch(vocab, gen):
    ids = torch.randint(3, vocab, (2, FS), generator=gen)
    pos = torch.cat([torch.cat([torch.arange(n) for n in lens])[None] for lens in ((5, 14, 13), (17, 9, 6))])
    ids[1, -6:] = 0  # row 2 ends in padding: one uniform last segment (mixtral's real-token mask)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, :4] = -100
    labels[1, -6:] = -100
    return ids, pos, labels


def _family_cases(seq, names):
    import dataclasses

    from models import get_family as family_of
    from models.attention import AttnOptions
    from models.block_base import LayerOptions
    from models.pipeline import SequentialModel, init_weights, training_loss
    from models.sequence_parallel import make_group

    n = seq.size
    sl = slice(seq.rank * FS // n, (seq.rank + 1) * FS // n)
    results = {}
    for name, over, sizes in FAMILY_CASES:
        if name not in names or n not in sizes:
            continue
        fam = family_of(name)
        args = fam.Args.from_hf_config(fam.tiny_hf_config(**over))
        if name == "mixtral":
            args = dataclasses.replace(args, router_z_loss_coef=0.05)
        ids, pos, labels = _family_batch(fam.dims(args).vocab, torch.Generator().manual_seed(3))
        scale = 1.0 / (labels != -100).sum()
        grads, losses = [], []
        for opts in (LayerOptions(attn=AttnOptions(packed=True)), LayerOptions(attn=AttnOptions(packed=True, seq=seq))):
            torch.manual_seed(0)
            model = SequentialModel(fam, args, opts)
            init_weights(model, 5)
            loss_fn = training_loss(fam, args, opts)
            if opts.attn.seq is None:
                loss = loss_fn(model(ids, pos), (labels, scale))
            else:  # as the loader gives it: my slice, the scale counting the seq ranks
                loss = loss_fn(model(ids[:, sl].contiguous(), pos[:, sl].contiguous()), (labels[:, sl], scale * n))
            loss.backward()
            g = torch.cat([p.grad.flatten() for p in model.parameters()])
            if opts.attn.seq is not None:  # what DeepSpeed's data-parallel average over the seq ranks makes of it
                torch.distributed.all_reduce(g, group=seq.group)
                g /= n
                lv = loss.detach().clone()
                torch.distributed.all_reduce(lv, group=seq.group)
                loss = lv / n
            grads.append(g)
            losses.append(float(loss.detach()))
            metrics = getattr(loss_fn, "pop_metrics", lambda: {})()
        results[name] = {"loss": losses, "grad": (grads[1] - grads[0]).abs().max().item(),
                         "grad_scale": grads[0].abs().max().item(), "metrics": metrics}
    return results


def _ranks(n):
    """One process group of n ranks runs every case of this size: attend eager (+ compiled at seq 2), families."""
    from engine import distributed as Dist

    Dist.init_distributed()
    from models.sequence_parallel import make_group

    seq = make_group(n, n)
    names = [f for f, _, sizes in FAMILY_CASES if n in sizes]
    return {"attend": _attend_cases(seq, False), "compiled": _attend_cases(seq, True) if n == 2 else {},
            "families": _family_cases(seq, names), "names": names}


@pytest.mark.parametrize("n", [2, 4], ids=["seq2", "seq4"])
def test_seq_ranks_equal_unsharded(n):
    """(1) attend: every rank's slice of the output and of dq/dk/dv equals the unsharded call's, on
    every mask / bias path (seq 4 with 2 or 1 KV heads: repeated; FlexAttention, forward only on CPU, at
    seq 2: bench/seq_check.py runs its backward on GPUs); at seq 2 also under torch.compile (the all-to-all
    is DeepSpeed's registered operator: nonzero, equal gradients).
    (2) each family's whole model on packed rows: the seq ranks' mean loss and averaged gradients
    (what the data-parallel all-reduce makes of them) equal the unsharded model's."""
    for rank, res in enumerate(run_ranks(_ranks, n, n, timeout=HANG_S)):
        assert sorted(res["attend"]) == sorted(c[0] for c in CASES if n == 2 or c[1] != "flex")
        assert sorted(res["compiled"]) == (sorted(COMPILED) if n == 2 else [])
        for case, e in [*res["attend"].items(), *((f"compiled {k}", v) for k, v in res["compiled"].items())]:
            assert e["scale"] > 0.1 and e["out"] < 1e-5, (rank, case, e)
            if "flex" not in case:
                assert e["grad_norm"] > 0, (rank, case, e)
                assert max(e[x] for x in ("dq", "dk", "dv")) < 1e-5, (rank, case, e)
        assert sorted(res["families"]) == sorted(res["names"])
        for name, r in res["families"].items():
            assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6), (rank, name, r)  # fp32 sums in another order
            assert r["grad"] < 1e-6 * max(1.0, r["grad_scale"]), (rank, name, r)



# ----------------------------------------------------------------------------- config and dry-run checks
def _cfg(dims, axes=("pipe", "data", "seq"), **over):
    from engine.config import from_dict
    from tests.test_train import config

    return from_dict(config("m", "s", model_topo={"process_topology": {"axes": list(axes), "dims": list(dims)}},
                            **over))


def test_seq_axis_config():
    """The batch triple counts data x seq ranks; bad layouts and models are one line naming the key."""
    from dataclasses import replace

    from engine.config import ConfigError, validate
    from engine.plan import check_seq
    from models import get_family

    cfg = _cfg([2, 1, 2])
    validate(cfg, 4, 6)
    assert (cfg.pipe_dim, cfg.data_dim, cfg.seq_dim) == (2, 1, 2)
    assert cfg.ds["train_batch_size"] == 2 * 2 * 2  # micro x accumulation x data x seq
    refused = [((4, [2, 2]), "axes must be [pipe, data] (or [pipe, data, seq]", {"axes": ("pipe", "seq", "data")}),
               ((4, [2, 2]), "dims must be 3 positive sizes", {}),
               ((6, [2, 1, 3]), "max_seq_len 64 is not divisible by the seq axis", {}),
               ((4, [2, 1, 2]), "train_batch_size 4 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps "
                                "2 x data-parallel size 2 (data 1 x seq 2) = 8", {"train_batch_size": 4})]
    for (world, dims), message, over in refused:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(_cfg(dims, **over), world, 6)

    def family_error(name, n, gpu=False, max_seq_len=256, **over):
        fam = get_family(name)
        args = fam.Args.from_hf_config(fam.tiny_hf_config(**over))
        try:
            check_seq(replace(_cfg([1, 1, n]), max_seq_len=max_seq_len), fam, args, gpu=gpu)
        except ConfigError as e:
            assert "model_topo.process_topology.dims" in str(e)
            return str(e)
        return None

    assert family_error("llama", 4) is None  # 2 KV heads repeated to 4
    assert family_error("chatglm", 4) is None
    assert "attention heads 6 is not divisible by seq 4" in family_error("bloom", 4)
    assert "not divisible by seq 2 x 128" in family_error("llama", 2, gpu=True, max_seq_len=384)  # flex tiles
    assert family_error("llama", 2, gpu=True, max_seq_len=512) is None
    assert "rope_type dynamic" in family_error("llama", 2, rope_scaling={"rope_type": "dynamic", "factor": 2.0})


# ----------------------------------------------------------------------------- training, real launcher
def _launch(tmp_path, name, n, *runs):
    """`deepspeed --num_gpus n`: train_ds.py on one (kind, config), or tests/launch_configs.py on several."""
    import yaml

    from tests.dist import free_port, launch

    paths = []
    for i, (kind, raw) in enumerate(runs):
        paths.append({"kind": kind, "config": str(tmp_path / f"{name}-{i}.yml")})
        (tmp_path / f"{name}-{i}.yml").write_text(yaml.safe_dump(raw))
    if len(runs) == 1 and runs[0][0] == "pipe":
        cfg, script = paths[0]["config"], "train_ds.py"
    else:
        cfg, script = tmp_path / f"{name}-runs.yml", "tests/launch_configs.py"
        cfg.write_text(yaml.safe_dump(paths))
    log = tmp_path / f"{name}.log"
    return launch(cfg, log, launcher_args=["--num_gpus", str(n), "--master_port", str(free_port())], script=script), log


def _finish(proc, log):
    """The launch's exit status (tests.dist.wait_group: a hang fails with every rank's stack)."""
    from tests.dist import wait_group

    assert wait_group(proc, timeout=HANG_S) == 0, log.read_text()[-5000:]


def _seq_topo(pp, n):
    return {"process_topology": {"axes": ["pipe", "data", "seq"], "dims": [pp, 1, n]}, "parts": [3, 3] if pp == 2 else "auto"}


def _losses(save, key="loss"):
    import json

    return {r["step"]: r[key] for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if key in r}


def _eval(**over):
    """Held-out loss at step 3 (the same rows sliced per seq rank: engine/training/evaluate.py)."""
    from tests.test_train import DATA

    return {"eval_data_path": DATA[:2], "eval_batches": 2, "evaluate_every": 3, **over}


def _weights(tag):
    out = {}
    for f in sorted(tag.glob("layer_*-model_states.pt")):
        for k, v in torch.load(f, weights_only=True).items():
            out[f"{f.name}:{k}"] = v
    return out


def _assert_same(a_save, b_save, steps, tag, tol=1e-6, metrics=()):
    a, b = _losses(a_save), _losses(b_save)
    # reduced over ranks in another order (float64 sums of fp32 partials): equal within fp32 rounding
    if 3 in steps:
        ea, eb = _losses(a_save, "eval_loss"), _losses(b_save, "eval_loss")
        assert eb[3] == pytest.approx(ea[3], rel=tol), (ea, eb)
    for key in metrics:  # the loss function's own metrics, averaged over the seq group (backends.seq_mean)
        ma, mb = _losses(a_save, key), _losses(b_save, key)
        assert all(mb[s] == pytest.approx(ma[s], rel=tol) for s in steps), (key, ma, mb)
    wa, wb = _weights(a_save / tag), _weights(b_save / tag)
    assert sorted(wa) == sorted(wb) and wa
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"{b_save.name} vs {a_save.name}: losses {[(s, a[s], b[s]) for s in steps]}, weights at {tag} within {worst:.2e}")
    for s in steps:
        assert b[s] == pytest.approx(a[s], abs=tol), (s, a, b)
    assert worst < tol, (tag, worst)


def test_pipeline_seq2_equals_pp2_and_resumes_at_seq1(tiny_pp, tmp_path):
    """train_ds.py under the deepspeed launcher: pp=2 x seq=2 (4 ranks) gives pp=2's per-step losses,
    held-out loss and final weights within 1e-6 over 3 steps; its checkpoint resumes at seq 1 (pp=2) and step 4
    equals the pp=2 run's step 4."""
    from tests.test_train import config

    z = {"aux_max_z_loss": {"weight": 0.01}}  # a loss with metrics of its own: lm_loss, z_loss (a per-position mean)
    _finish(*_launch(tmp_path, "seq", 4, ("pipe", config(tiny_pp, tmp_path / "seq", steps=3, model_topo=_seq_topo(2, 2),
                                                         **_eval(**z)))))
    # one pp=2 launch: the reference (4 steps, saved at 3 and 4), then the seq run's save_path at seq 1
    # (resumes its global_step3, runs step 4)
    _finish(*_launch(tmp_path, "pp2", 2, ("pipe", config(tiny_pp, tmp_path / "ref", steps=4, save_every_steps=3,
                                                         **_eval(**z))),
                     ("pipe", config(tiny_pp, tmp_path / "seq", steps=4, **z))))
    _assert_same(tmp_path / "ref", tmp_path / "seq", (1, 2, 3), "global_step3", metrics=("lm_loss", "z_loss"))
    assert sorted(_losses(tmp_path / "seq")) == [1, 2, 3, 4]
    _assert_same(tmp_path / "ref", tmp_path / "seq", (4,), "global_step4", metrics=("lm_loss", "z_loss"))


def test_zero_stages_seq2_equal_one_rank(tiny_pp, tmp_path):
    """train_ds_zero.py's training at ZeRO-1, 2 and 3 with seq 2 (2 ranks, one launch) gives each
    stage's one-rank losses, held-out loss and final weights within 1e-6 over 3 steps."""
    from tests.test_train import config

    def raw(stage, topo, name):
        return ("zero", config(tiny_pp, tmp_path / name, parts=None, steps=3, zero_optimization={"stage": stage},
                               model_topo=topo, **_eval()))

    one = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}}
    refs = _launch(tmp_path, "one", 1, *(raw(s, one, f"one{s}") for s in (1, 2, 3)))
    seqs = _launch(tmp_path, "seq", 2, *(raw(s, _seq_topo(1, 2), f"seq{s}") for s in (1, 2, 3)))
    _finish(*refs)
    _finish(*seqs)
    for s in (1, 2, 3):
        _assert_same(tmp_path / f"one{s}", tmp_path / f"seq{s}", (1, 2, 3), "global_step3")
