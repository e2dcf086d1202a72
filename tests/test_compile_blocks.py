"""Every family's block compiles as one graph (0 graph breaks), and a head dim FlexAttention
cannot run falls back to SDPA with the dense document mask (issue 25).

torch._dynamo.explain traces the block on the CPU (no inductor codegen: fast). The packed path
is traced with SDPA and its boolean document mask, and with FlexAttention's BlockMask under
no_grad (FlexAttention has no CPU backward). Mixtral runs in bf16: its grouped GEMM
(torch._grouped_mm) traces in bf16 only; in fp32 it would take the per-expert loop, which reads
the group sizes back to the host (a graph break by design, the fallback path).
"""
from __future__ import annotations

import pytest
import torch

from models import get_family
from models.attention import AttnOptions, options_for_head_dim
from models.block_base import BlockBase, LayerOptions
from models.masks import attention_mask
from models.pipeline import SequentialModel

CASES = {  # name: (family, tiny_hf_config overrides)
    "llama": ("llama", {}),
    "bloom": ("bloom", {}),
    "baichuan-rope": ("baichuan", {}),
    "baichuan-alibi": ("baichuan", {"position_embedding": "alibi"}),
    "chatglm": ("chatglm", {}),
    "mixtral": ("mixtral", {}),
}


def first_block(family_name: str, overrides: dict, impl: str):
    fam = get_family(family_name)
    args = fam.Args.from_hf_config(fam.tiny_hf_config(**overrides))
    model = SequentialModel(fam, args, LayerOptions(attn=AttnOptions(packed=True, impl=impl)))
    block = next(m for m in model.children() if isinstance(m, BlockBase))
    return fam, args, block


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_has_no_graph_breaks(case, impl):
    family_name, overrides = CASES[case]
    torch._dynamo.reset()
    fam, args, block = first_block(family_name, overrides, impl)
    head_dim = fam.dims(args).head_dim
    if impl == "flex" and head_dim < 16:  # the tiny bloom (8): SDPA instead, the fallback's own test below
        assert block.attn_opts.impl == "sdpa"
    dtype = torch.bfloat16 if family_name == "mixtral" else torch.float32
    block = block.to(dtype)
    pos = torch.cat([torch.arange(n) for n in (20, 12, 32)])[None].repeat(2, 1)  # packed rows
    x = torch.randn(2, pos.shape[1], fam.dims(args).hidden, dtype=dtype)
    mask = attention_mask(pos, block.attn_opts, block.window)
    assert isinstance(mask, torch.Tensor) == (block.attn_opts.impl == "sdpa")  # the mask form follows the impl
    with torch.set_grad_enabled(block.attn_opts.impl != "flex"):
        explained = torch._dynamo.explain(block.block)(x, pos, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_small_head_dim_falls_back_from_flex():
    """FlexAttention needs a head dim >= 16 ('NYI: embedding dimension ... at least 16' on the
    GPU): the tiny bloom (6 heads of 8) gets SDPA and the dense mask, and its packed loss equals
    the reference's; a head dim of 16 keeps flex."""
    opts = LayerOptions(attn=AttnOptions(packed=True, impl="flex"))
    assert options_for_head_dim(opts, 8).attn == AttnOptions(packed=True, impl="sdpa")
    assert options_for_head_dim(opts, 16) is opts
    assert options_for_head_dim(LayerOptions(attn=AttnOptions(packed=True, impl="sdpa")), 8).attn.impl == "sdpa"
    fam, args, block = first_block("bloom", {}, "flex")
    assert fam.dims(args).head_dim == 8 and block.attn_opts.impl == "sdpa"
    _, _, llama_block = first_block("llama", {}, "flex")
    assert llama_block.attn_opts.impl == "flex"
    # the fallback model computes what the plain SDPA model does
    torch.manual_seed(0)
    fast = SequentialModel(fam, args, opts).eval()
    ref = SequentialModel(fam, args, LayerOptions(attn=AttnOptions(packed=True, impl="sdpa"))).eval()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(3, 300, (1, 40))
    pos = torch.cat([torch.arange(n) for n in (15, 25)])[None]
    with torch.no_grad():
        assert torch.equal(fast(ids, pos), ref(ids, pos))


@pytest.mark.parametrize("case", ["bloom", "baichuan-alibi"])
def test_alibi_on_flex_keeps_the_document_block_mask(case, monkeypatch):
    """ALiBi runs on FlexAttention as a score_mod next to the document BlockMask, so flex still
    skips the tiles between documents (the mask is sparse and is what flex gets), and the result
    equals SDPA with the bias and the dense document mask (CPU, no grad: flex has no CPU backward)."""
    import models.attention as attention

    family_name, overrides = CASES[case]
    fam = get_family(family_name)
    hf = fam.tiny_hf_config(**overrides, **({"hidden_size": 128, "n_head": 4} if family_name == "bloom" else {}))
    args = fam.Args.from_hf_config(hf)
    assert fam.dims(args).positional == "alibi" and fam.dims(args).head_dim >= 16
    flex = SequentialModel(fam, args, LayerOptions(attn=AttnOptions(packed=True, impl="flex"))).eval()
    sdpa = SequentialModel(fam, args, LayerOptions(attn=AttnOptions(packed=True, impl="sdpa"))).eval()
    sdpa.load_state_dict(flex.state_dict())
    seen = []
    real_flex = attention._flex()

    def spy(q, k, v, score_mod=None, block_mask=None, **kw):
        seen.append((score_mod, block_mask))
        return real_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, **kw)

    monkeypatch.setattr(attention, "_flex", lambda: spy)
    ids = torch.randint(3, 300, (1, 384))
    pos = torch.arange(128).repeat(3)[None]  # three 128-token documents: one 128 x 128 tile each
    with torch.no_grad():
        out_flex, out_sdpa = flex(ids, pos), sdpa(ids, pos)
    assert len(seen) == args.num_layers
    for score_mod, block_mask in seen:
        assert score_mod is not None and block_mask is not None
        assert block_mask.sparsity() > 50  # 3 of 6 causal tiles are cross-document: skipped
    assert (out_flex - out_sdpa).abs().max() < 1e-4 * out_sdpa.abs().max()
