"""Long context (issue 33 items 3-4): the document BlockMask built from block tables (no [S, S]
tensor), the dense-mask refusal, the chunked head + cross-entropy (every family, tied heads, the
max-z term), activation offload, and the dry run's long-context table. CPU, fp32."""
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils._python_dispatch import TorchDispatchMode

from engine import plan
from engine.config import ConfigError, from_dict
from models import bloom, llama, mixtral, baichuan, chatglm, offload
from models.attention import AttnOptions
from models.block_base import LayerOptions
from models.loss import HeadInput
from models.masks import DENSE_MASK_MAX_SEQ, attention_mask, document_block_mask, document_ids
from models.pipeline import SequentialModel, chunked_heads, init_weights, training_loss


# ----------------------------------------------------------------------------- the document BlockMask
def old_block_mask(position_ids, packed, window):
    """The mask as it was built before: create_block_mask, uncompiled (evaluates every [B, 1, S, S] point)."""
    b, s = position_ids.shape
    doc = document_ids(position_ids) if packed else None

    def mask_mod(bi, hi, qi, ki):
        keep = qi >= ki
        if doc is not None:
            keep = keep & (doc[bi, qi] == doc[bi, ki])
        if window is not None:
            keep = keep & (qi - ki < window)
        return keep

    return create_block_mask(mask_mod, b, None, s, s, device=position_ids.device)


def packed_rows(s: int, b: int = 2, longest: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        lens = []
        while sum(lens) < s:
            lens.append(int(torch.randint(1, longest, (1,), generator=g)))
        rows.append(torch.cat([torch.arange(n) for n in lens])[:s])
    return torch.stack(rows)


def same_blocks(new, old):
    """Equal block tables: counts, and the indices each count says are valid (the rest is padding)."""
    assert new.seq_lengths == old.seq_lengths and new.BLOCK_SIZE == old.BLOCK_SIZE
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                     ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n = getattr(new, num)
        assert torch.equal(n, getattr(old, num)), num
        valid = torch.arange(getattr(new, idx).shape[-1]) < n[..., None]
        assert torch.equal(getattr(new, idx)[valid], getattr(old, idx)[valid]), idx


@pytest.mark.parametrize("s", [128, 300, 1024, 1500])
def test_block_mask_equals_create_block_mask(s):
    """Every block table equals create_block_mask's: packed or not, with and without a sliding window
    (inside a block, across blocks, longer than the row), S a multiple of 128 or not."""
    pos = packed_rows(s, seed=s)
    for packed, window in ((True, None), (True, 64), (True, 200), (True, 5000), (False, 64), (False, 300)):
        opts = AttnOptions(packed=packed, impl="flex")
        same_blocks(attention_mask(pos, opts, window), old_block_mask(pos, packed, window))


def test_block_mask_attention_output():
    """flex_attention under the new mask = under the old one = SDPA with the dense mask (GQA, packed, window)."""
    s = 384
    pos = packed_rows(s, longest=200)
    doc = document_ids(pos)
    new = document_block_mask(doc, 2, s, 150, "cpu")
    q, k, v = torch.randn(2, 4, s, 16), torch.randn(2, 2, s, 16), torch.randn(2, 2, s, 16)
    i = torch.arange(s)
    dense = (i[:, None] >= i[None]) & (i[:, None] - i[None] < 150) & (doc[:, :, None] == doc[:, None, :])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], enable_gqa=True)
    out = flex_attention(q, k, v, block_mask=new, enable_gqa=True)
    assert torch.equal(out, flex_attention(q, k, v, block_mask=old_block_mask(pos, True, 150), enable_gqa=True))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op returns while active (element count)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_block_mask_allocates_no_s_by_s():
    """At 4096 tokens the mask's largest tensor is the [B, S] document ids or a block table
    (B x 32 x 32), not [B, 1, S, S] as create_block_mask's uncompiled build (which the probe does see)."""
    s, b = 4096, 2
    pos = packed_rows(s, b, longest=1500)
    with LargestTensor() as probe:
        attention_mask(pos, AttnOptions(packed=True, impl="flex"), 2048)
    n = s // 128
    assert probe.numel <= max(b * s, b * n * n), probe.numel
    with LargestTensor() as old:
        old_block_mask(pos, True, 2048)
    assert old.numel >= b * s * s  # the probe sees the dense build where there is one


def tiny_cfg(**keys):
    raw = {"model_path": "m", "data_path": ["d.jsonl"], "save_path": "s", "train_micro_batch_size_per_gpu": 1,
           "gradient_accumulation_steps": 1, **keys}
    return from_dict(raw, "long.yml")


@pytest.mark.parametrize("family,keys,gpu,refused", [
    (llama, {"packing": True}, True, False),  # flex: block tables
    (llama, {"packing": True}, False, True),  # CPU: SDPA with the dense document mask
    (llama, {"packing": False}, True, False),  # plain causal: no mask at all
    (llama, {"packing": True, "max_seq_len": DENSE_MASK_MAX_SEQ}, False, False),  # at the threshold: allowed
    (bloom, {"packing": False}, True, True),  # ALiBi outside flex: dense [B, H, S, S] bias
    (bloom, {"packing": True}, True, False),  # ALiBi as flex's score_mod
    (mixtral, {"packing": False}, True, True),  # sliding window on SDPA: dense mask
])
def test_dense_attention_refused_over_threshold(family, keys, gpu, refused):
    overrides = {"sliding_window": 4096, "hidden_size": 128, "num_attention_heads": 4} if family is mixtral else \
        {"hidden_size": 128, "n_head": 4} if family is bloom else {}
    args = family.Args.from_hf_config(family.tiny_hf_config(**overrides))
    cfg = tiny_cfg(**{"max_seq_len": 65536, **keys})
    if not refused:
        plan.check_dense_attention(cfg, family, args, gpu=gpu)
        return
    with pytest.raises(ConfigError, match=r"^long.yml: max_seq_len 65536 is over 16384 and .*dense"):
        plan.check_dense_attention(cfg, family, args, gpu=gpu)


# ----------------------------------------------------------------------------- chunked head + cross-entropy
FAMILIES = {
    "llama": (llama, {}),
    "llama_tied": (llama, {"tie_word_embeddings": True}),
    "bloom_tied": (bloom, {}),
    "bloom_untied": (bloom, {"tie_word_embeddings": False}),
    "mixtral": (mixtral, {}),  # MoELoss around the LM term, router z-loss on
    "mixtral_tied": (mixtral, {"tie_word_embeddings": True}),
    "baichuan2": (baichuan, {}),  # NormHead: rows normalised once per micro-batch
    "chatglm": (chatglm, {}),
}


def loss_and_grads(family, args, opts, state, ids, pos, labels):
    model = SequentialModel(family, args, opts).train()
    model.load_state_dict(state)
    out = model(ids, pos)
    logits = out[0] if isinstance(out, tuple) and not isinstance(out, HeadInput) else out  # mixtral: + router terms
    assert isinstance(logits, HeadInput) == bool(opts.head_chunk)  # chunked: the head hands over (hidden, weight)
    loss = training_loss(family, args, opts)(out, (labels, torch.tensor(0.25)))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss


@pytest.mark.parametrize("name", list(FAMILIES))
def test_chunked_loss_equals_whole_logits(name):
    """Loss and every gradient equal the whole-logits loss (fp32), with -100 labels, a chunk that does not
    divide the tokens, packed rows; the max-z term too (llama, bloom)."""
    family, overrides = FAMILIES[name]
    hf = family.tiny_hf_config(**overrides)
    if family is mixtral:
        hf["router_z_loss_coef"] = 0.01
    args = family.Args.from_hf_config(hf)
    torch.manual_seed(0)
    ref_model = SequentialModel(family, args)
    init_weights(ref_model, seed=3)
    state = ref_model.state_dict()
    b, s = 2, 40
    ids = torch.randint(4, family.dims(args).vocab, (b, s))
    pos = packed_rows(s, b, longest=25)
    labels = ids.roll(-1, 1).masked_fill(torch.rand(b, s) < 0.3, -100)
    z = 0.1 if family in (llama, bloom) else 0.0
    base = LayerOptions(attn=AttnOptions(packed=True), max_z_loss=z)
    ref_loss, ref_grads, _ = loss_and_grads(family, args, base, state, ids, pos, labels)
    loss, grads, out = loss_and_grads(family, args, dataclasses.replace(base, head_chunk=7), state, ids, pos, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 4
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_chunked_head_never_holds_whole_logits():
    """With head_chunk the largest [rows, vocab] tensor of the forward and backward is one chunk's."""
    args = llama.Args.from_hf_config(llama.tiny_hf_config(vocab_size=1000))
    model = SequentialModel(llama, args, LayerOptions(head_chunk=16)).train()
    loss_fn = training_loss(llama, args, LayerOptions(head_chunk=16))
    ids = torch.randint(4, 1000, (2, 64))
    with LargestTensor() as probe:
        loss_fn(model(ids), (ids, torch.tensor(1.0))).backward()
    assert probe.numel == 1000 * 64  # the [V, H] weight gradient; a chunk's logits are 16 x 1000
    whole = SequentialModel(llama, args, LayerOptions()).train()
    with LargestTensor() as probe:
        training_loss(llama, args, LayerOptions())(whole(ids), (ids, torch.tensor(1.0))).backward()
    assert probe.numel >= 2 * 64 * 1000  # whole logits [128 tokens, 1000]


def test_chunked_heads_marks_the_head_only():
    """The pipeline hands chunked_heads its stage layers + tied modules: the head (or the embedding a
    tied head projects through) is switched, blocks and norms are not; off: nothing."""
    args = llama.Args.from_hf_config(llama.tiny_hf_config(tie_word_embeddings=True))
    model = SequentialModel(llama, args)
    layers = list(model._modules.values())
    assert chunked_heads(llama, args, layers, LayerOptions()) == 0
    assert chunked_heads(llama, args, layers, LayerOptions(head_chunk=8)) == 2  # the embedding = its twin
    assert all(getattr(m, "chunked_loss", None) is None for m in layers[1:-2])


# ----------------------------------------------------------------------------- activation offload
def test_offload_gives_identical_grads(monkeypatch):
    """Full recompute with offload_activations: the same loss and gradients, bit for bit, and the
    offloader moved exactly each block's input (B x S x H fp32 per block)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    args = llama.Args.from_hf_config(llama.tiny_hf_config())
    ids = torch.randint(4, 320, (2, 48))
    pos = packed_rows(48, 2, longest=30)
    runs = []
    for off in (False, True):
        opts = LayerOptions(attn=AttnOptions(packed=True), grad_ckpt="full", offload=off)
        model = SequentialModel(llama, args, opts).train()
        init_weights(model, seed=5)
        before = offload.packed_bytes()
        loss = training_loss(llama, args, opts)(model(ids, pos), (ids.roll(-1, 1), torch.tensor(0.5)))
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, offload.packed_bytes() - before))
    (l0, g0, moved0), (l1, g1, moved1) = runs
    assert torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert moved0 == 0 and moved1 == args.num_layers * 2 * 48 * args.hidden_size * 4


def test_offload_config_needs_full_recompute():
    with pytest.raises(ConfigError, match="offload_activations: true .* use_grad_ckpt: true"):
        from engine.config import _check_long_context
        _check_long_context(tiny_cfg(offload_activations=True, use_grad_ckpt="selective"))
    with pytest.raises(ConfigError, match="head_chunk_tokens and kernels: liger"):
        from engine.config import _check_long_context
        _check_long_context(tiny_cfg(head_chunk_tokens=4096, kernels="liger"))


# ----------------------------------------------------------------------------- the dry run's table
LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-5)


def test_dry_run_table_follows_the_model():
    """Each row of the long-context table is the cost model's estimate at that length with that lever;
    offload takes every block input but one off the GPU (onto the host), chunking takes the head's
    logits down to one chunk's."""
    args = llama.Args.from_hf_config(LLAMA_7B)
    setup = plan.Setup(seq=131072, micro=1, n_micro=8, pp=2, ckpt="full", compiled=True, packed=True)
    parts = [3, 3]  # embedding + 2 blocks | 2 blocks + head
    lines = plan.long_context_table(llama, args, setup, parts, 80.0)
    rows = {(int(c[0]), c[1]): [float(x.rstrip("!")) for x in c[2:]] for c in (l.split() for l in lines[2:-1])}
    assert len(rows) == 16
    gib = plan.GiB
    for (seq, lever), cells in rows.items():
        kw = {"none": {}, "offload": dict(offload=True), "chunk": dict(head_chunk=plan.TABLE_CHUNK),
              "offload+chunk": dict(offload=True, head_chunk=plan.TABLE_CHUNK)}[lever]
        s = dataclasses.replace(setup, seq=seq, **kw)
        est = plan.estimate(plan.layer_costs(llama, args, s), parts, s)
        assert cells == [round(e.peak / gib, 1) for e in est] + [round(max(e.extra["host"] for e in est) / gib, 1)]
    # the levers' effect, from the model's terms: stage 0 keeps 2 micro-batches x 2 blocks of [S, H] bf16 inputs
    seq = 131072
    block_input = seq * 4096 * 2 / gib
    assert rows[(seq, "none")][0] - rows[(seq, "offload")][0] == pytest.approx(2 * 2 * block_input - block_input, abs=0.11)
    assert rows[(seq, "offload")][2] == pytest.approx(2 * 2 * block_input, abs=0.06)
    logits = 32000 * 4 / gib  # compiled: bf16 logits + their gradient per token
    assert rows[(seq, "none")][1] - rows[(seq, "chunk")][1] == pytest.approx((seq - plan.TABLE_CHUNK) * logits, abs=0.11)
    assert rows[(seq, "none")][0] == rows[(seq, "chunk")][0]  # no head on stage 0
    assert "tiled MLP (not built)" in lines[-1]


# ----------------------------------------------------------------------------- the GPU steps file
def test_gpu_steps_parse_and_fit_one_h100(tmp_path):
    """Every run step of bench/steps_long.txt parses with bench_train's own parser, builds a valid config
    (the levers are real keys) and, by the dry run, fits one H100 (< 78 GiB) on the path it takes."""
    import json
    import shlex
    from pathlib import Path

    from bench.bench_train import case_config, family_config, model_dir, parser
    from engine.config import validate
    from engine.model import Model

    steps = [line.split("|", 2) for line in (Path(__file__).parent.parent / "bench" / "steps_long.txt").read_text()
             .splitlines() if line and not line.startswith("#")]
    runs = [cmd for _, secs, cmd in steps if " run " in cmd]
    assert len(runs) == 8 and all(int(secs) <= 130 for _, secs, _ in steps)
    for cmd in runs:
        argv = shlex.split(cmd)
        a = parser().parse_args(argv[argv.index("bench/bench_train.py") + 1:])
        hf = model_dir(tmp_path, a.family)
        hf.mkdir(exist_ok=True)
        (hf / "config.json").write_text(json.dumps(family_config(a.family)))
        cfg = case_config(tmp_path, a.name, a.seq, a.set, a.family)
        model = Model.for_training(cfg)
        validate(cfg, 1, model.n_layers)
        plan.check_dense_attention(cfg, model.family, model.args, gpu=True)
        _, stages = plan.report(cfg, model.family, model.args, 1)
        assert max(s.peak for s in stages) < 78 * plan.GiB, (a.name, [s.peak / plan.GiB for s in stages])
        assert (cfg.offload_activations, cfg.head_chunk_tokens > 0) == ("both" in a.name or "offload" in a.name,
                                                                          "both" in a.name or "chunk" in a.name)


# ----------------------------------------------------------------------------- through the pipeline
def _train_counting(raw):
    """One rank's training (tests.dist.run_ranks): the losses and the bytes the offloader moved,
    every saved block input counted (MIN_BYTES 1: the tiny model's are a few KiB)."""
    from engine.training.loop import train

    offload.MIN_BYTES = 1
    return train(from_dict(raw)).losses, offload.packed_bytes()


def test_levers_keep_the_pipeline_losses(tiny_pp, tmp_path):
    """pp=2 on 2 gloo ranks, fp32, full recompute, gdGPT's max-z term on: offload_activations +
    head_chunk_tokens give the same per-step losses as neither: the head's HeadInput crosses
    DeepSpeed's last stage into the chunked loss, and both stages' block inputs went to the offloader."""
    from tests.dist import run_ranks
    from tests.test_train import config

    raw = config(tiny_pp, tmp_path / "plain", steps=2, use_grad_ckpt=True, aux_max_z_loss={"weight": 0.01})
    plain = run_ranks(_train_counting, 2, raw)
    levers = run_ranks(_train_counting, 2, {**raw, "save_path": str(tmp_path / "levers"), "offload_activations": True,
                                            "head_chunk_tokens": 24})
    assert [moved for _, moved in plain] == [0, 0] and all(moved > 0 for _, moved in levers)
    (a, _), (b, _) = plain[0], levers[0]
    assert a.keys() == b.keys() == {1, 2} and plain[1][0] == a and levers[1][0] == b
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5 * abs(a[step]), (a, b)
