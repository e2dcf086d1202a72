"""Kernel and FP8 switches (issue 27): `kernels: liger`, `fp8: rowwise_with_gw_hp | auto`, `fp8_head`.

liger's kernels are Triton (GPU only): here the config, the machine checks, the module swaps and
the loss fallback; the numerics against the inductor path are bench/gpu_check.py's (GPU).
"""
import sys
import types

import pytest
import torch
from torch import nn

from engine.config import ConfigError, from_dict, help_text, validate
from tests.test_config import base


@pytest.mark.parametrize("over, pipeline, message", [
    ({"kernels": "triton"}, True, "kernels must be inductor or liger, got 'triton'"),
    ({"kernels": "liger"}, False, "kernels: liger is supported on the pipeline path (train_ds.py) only"),
    ({"fp8_head": True, "fp8": "off"}, True, "fp8_head: true needs fp8 on"),
    ({"kernels": "liger", "compile_blocks": True}, True, "kernels: liger with compile_blocks: true fails to compile"),
    ({"fp8": "tensorwise", "fp8_head": True, "kernels": "liger", "bf16": {"enabled": True}}, True,
     "fp8_head and kernels: liger both claim the head projection"),
    ({"fp8": "delayed"}, True, "fp8 must be one of off, tensorwise, rowwise, rowwise_with_gw_hp, auto, got 'delayed'"),
    ({"fp8": "rowwise_with_gw_hp"}, True, "fp8: rowwise_with_gw_hp needs bf16"),
])
def test_bad_kernel_and_fp8_values_are_one_line_errors(over, pipeline, message):
    raw = base(**over)
    if not pipeline:
        raw.update(model_topo={"process_topology": {"dims": [1, 2]}}, zero_optimization={"stage": 2})
    with pytest.raises(ConfigError) as e:
        validate(from_dict(raw, "x.yml"), 2, 6, pipeline=pipeline)
    assert str(e.value).startswith("x.yml: ") and message in str(e.value) and "\n" not in str(e.value)


def test_new_keys_validate_and_are_listed_by_help_config():
    for over in ({"kernels": "liger"}, {"fp8": "rowwise_with_gw_hp", "bf16": {"enabled": True}},
                 {"fp8": "auto"}, {"fp8": "auto", "fp8_head": True, "bf16": {"enabled": True}}):
        validate(from_dict(base(**over), "x.yml"), 2, 6)
    validate(from_dict(base(fp8="auto", model_topo={"process_topology": {"dims": [1, 2]}},
                            zero_optimization={"stage": 3}), "x.yml"), 2, 6, pipeline=False)  # auto: off there
    cfg = from_dict(base(), "x.yml")
    assert (cfg.kernels, cfg.fp8, cfg.fp8_head) == ("inductor", "auto", False)  # auto: tests/test_fp8_auto.py
    text = help_text()
    assert all(f"{k}:" in text for k in ("kernels", "fp8_head")) and "rowwise_with_gw_hp" in text


def test_liger_on_a_machine_that_cannot_run_it_is_one_line(monkeypatch):
    from engine.training.deepspeed_setup import layer_options

    cfg = from_dict(base(kernels="liger"), "x.yml")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    with pytest.raises(ConfigError, match=r"^x.yml: kernels: liger needs liger-kernel \(pip install liger-kernel\)"):
        layer_options(cfg)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", types.ModuleType("liger_kernel.ops"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^x.yml: kernels: liger needs a GPU \(liger's kernels are Triton\); "
                                          r"set kernels: inductor$"):
        layer_options(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert layer_options(cfg).kernels == "liger"
    assert layer_options(from_dict(base(), "x.yml")).kernels == "inductor"


def _tiny_llama_layers():
    from models import llama
    from models.block_base import LayerOptions
    from models.pipeline import SequentialModel

    args = llama.Args.from_hf_config(llama.tiny_hf_config())
    return llama, args, SequentialModel(llama, args, LayerOptions())


def test_liger_blocks_switches_block_ops_and_the_untied_head():
    from models.block_base import BlockBase
    from models.norm_mlp import GatedMLP, RMSNorm
    from models.llama import Attention, Head
    from models.loss import HeadInput, causal_lm_loss, liger_causal_lm_loss
    from models.pipeline import liger_blocks

    llama, args, model = _tiny_llama_layers()
    layers = list(model.children())
    logits_before = model(torch.randint(0, args.vocab_size, (2, 8)))
    n = liger_blocks(layers)
    blocks = [m for m in layers if isinstance(m, BlockBase)]
    assert n == len(blocks) * 4 + 1  # 2 norms + MLP + attention per block, and the head
    assert all(m.liger for b in blocks for m in b.modules() if isinstance(m, (RMSNorm, GatedMLP)))
    assert all(m.liger_rope for b in blocks for m in b.modules() if isinstance(m, Attention))
    head = next(m for m in layers if isinstance(m, Head))
    assert head.fused_loss and not head.norm.liger  # the final norm stays (not in a compiled block)
    x = torch.randn(2, 8, args.hidden_size)
    out = head((x, None))
    assert isinstance(out, HeadInput) and out[1] is head.lm_head.weight
    # logits (a head that did not hand over HeadInput) take the plain loss, same value
    labels = torch.randint(0, args.vocab_size, (2, 8))
    labels[0, :3] = -100
    target = (labels, torch.tensor(0.25))
    assert torch.equal(liger_causal_lm_loss(logits_before, target), causal_lm_loss(logits_before, target))
    _, _, fresh = _tiny_llama_layers()
    liger_blocks(list(fresh.children()), fused_loss=False)  # a family loss of its own: logits stay
    assert not next(m for m in fresh.children() if isinstance(m, Head)).fused_loss


def test_fp8_head_swaps_lm_head_only_when_asked():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from models.block_base import BlockBase
    from models.pipeline import float8_blocks

    for head in (False, True):
        _, _, model = _tiny_llama_layers()
        layers = list(model.children())
        float8_blocks(layers, "rowwise_with_gw_hp", head=head)
        lm_head = layers[-1].lm_head
        assert isinstance(lm_head, Float8Linear) is head  # vocab 320 x hidden 64: multiples of 16
        block = next(m for m in layers if isinstance(m, BlockBase))
        assert isinstance(block.self_attn.qkv_proj, Float8Linear)
        assert isinstance(layers[0].embed_tokens, nn.Embedding)  # embedding untouched


def test_liger_wiring_with_torch_stand_ins_matches_the_inductor_path(monkeypatch):
    """liger's Triton kernels need a GPU; here each liger entry point the models call is replaced by
    the torch computation it stands for, so the wiring (argument order, the fused [gate | up] layout,
    rotary shapes, HeadInput -> fused linear CE with -100 and the loader's scale) is checked on the
    CPU: same loss and gradients as the plain path. The kernels' own numerics: bench/gpu_check.py."""
    import torch.nn.functional as F

    from models.positions import apply_rotary
    from models.loss import causal_lm_loss, liger_causal_lm_loss
    from models.pipeline import liger_blocks

    called = set()

    def fn(f):
        def apply(*a):
            called.add(f.__name__)
            return f(*a)
        return type("Fn", (), {"apply": staticmethod(apply)})

    def rms(x, w, eps, offset, mode, in_place):
        assert (offset, mode, in_place) == (0.0, "llama", False)
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def swiglu(y):
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up

    def flce(h, w, labels, ignore_index, reduction, accum_dtype):
        assert h.dim() == 2 and labels.dim() == 1 and reduction == "sum" and accum_dtype is torch.float32
        return F.cross_entropy((h @ w.t()).float(), labels, ignore_index=ignore_index, reduction="sum")

    ops = types.ModuleType("liger_kernel.ops")
    ops.LigerRMSNormFunction, ops.LigerFusedGateUpSiLUMulFunction = fn(rms), fn(swiglu)
    ops.LigerRopeFunction = fn(lambda q, k, cos, sin: (apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)))
    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = lambda *a, **k: (called.add("flce"), flce(*a, **k))[1]
    for name, mod in (("liger_kernel", types.ModuleType("liger_kernel")), ("liger_kernel.ops", ops),
                      ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
                      ("liger_kernel.transformers.functional", functional)):
        monkeypatch.setitem(sys.modules, name, mod)

    _, args, plain = _tiny_llama_layers()
    _, _, liger = _tiny_llama_layers()
    liger.load_state_dict(plain.state_dict())
    liger_blocks(list(liger.children()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab_size, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two documents per row
    labels = torch.roll(ids, -1, dims=1)
    labels[:, 9] = labels[:, -1] = -100
    labels[1, :5] = -100  # an answer-masked prompt
    scale = torch.tensor(1.0 / int((labels != -100).sum()))
    losses = []
    for model, loss_fn in ((plain, causal_lm_loss), (liger, liger_causal_lm_loss)):
        loss = loss_fn(model(ids, pos), (labels, scale))
        loss.backward()
        losses.append(loss.detach())
    assert called == {"rms", "swiglu", "<lambda>", "flce"}  # every liger entry point was taken
    assert torch.allclose(losses[0], losses[1], rtol=1e-5) and losses[0] > 1.0
    for (name, p), q in zip(plain.named_parameters(), liger.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
