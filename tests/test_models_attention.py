"""The attention paths agree: SDPA with a dense mask, FlexAttention's block mask, eager math."""
import pytest
import torch

from models.attention import AttnOptions, attend
from models.masks import attention_mask


def packed_positions(b: int, lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).expand(b, sum(lengths)).contiguous()


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_equals_sdpa_and_eager(window, kv_heads):
    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 4, 48, 16
    q = torch.randn(b, h, s, d, generator=g)
    k, v = (torch.randn(b, kv_heads, s, d, generator=g) for _ in range(2))
    pos = packed_positions(b, [20, 17, 11])
    outs = {}
    for impl in ("sdpa", "flex", "eager"):
        opts = AttnOptions(packed=True, impl=impl)
        outs[impl] = attend(q, k, v, attention_mask(pos, opts, window), opts)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-5, rtol=0)


def test_mask_is_built_once_per_position_tensor():
    opts = AttnOptions(packed=True)
    pos = packed_positions(1, [5, 7])
    first = attention_mask(pos, opts)
    assert attention_mask(pos, opts) is first  # same tensor object: the cached mask
    other = packed_positions(1, [6, 6])
    second = attention_mask(other, opts)
    assert second is not first and not torch.equal(second, first)
    assert attention_mask(pos, AttnOptions(packed=False)) is None  # plain causal needs no mask


def test_backend_choice(monkeypatch):
    """Packed rows on GPU take FlexAttention even with use_flash_attn (flash-attn's causal kernel has
    no document mask: attend would fall back to SDPA with a dense one); plain rows take flash-attn
    when it imports; the CPU always SDPA."""
    import types

    from models.attention import attn_impl

    monkeypatch.setitem(__import__("sys").modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attn_impl(packed=True, use_flash_attn=True, on_gpu=True) == "flex"
    assert attn_impl(packed=False, use_flash_attn=True, on_gpu=True) == "flash"
    assert attn_impl(packed=False, use_flash_attn=False, on_gpu=True) == "sdpa"
    assert attn_impl(packed=True, use_flash_attn=True, on_gpu=False) == "sdpa"
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # not installed: import fails
    assert attn_impl(packed=False, use_flash_attn=True, on_gpu=True) == "sdpa"


def test_flex_expands_large_kv_groups(monkeypatch):
    """Groups of FLEX_EXPAND_GROUP query heads or more per KV head run FlexAttention on K/V expanded
    first (faster backward, bench/gqa_flex_bench.py); the result equals enable_gqa's and SDPA's."""
    import models.attention as attention

    g = torch.Generator().manual_seed(1)
    b, h, s, d = 1, 16, 40, 16
    q = torch.randn(b, h, s, d, generator=g)
    k, v = (torch.randn(b, 1, s, d, generator=g) for _ in range(2))
    opts = AttnOptions(packed=True, impl="flex")
    mask = attention_mask(packed_positions(b, [23, 17]), opts)
    seen = []
    flex = attention._flex()
    monkeypatch.setattr(attention, "_flex", lambda: lambda q, k, v, **kw: seen.append((k.shape[1], kw["enable_gqa"])) or flex(q, k, v, **kw))
    expanded = attend(q, k, v, mask, opts)
    monkeypatch.setattr(attention, "FLEX_EXPAND_GROUP", h + 1)
    grouped = attend(q, k, v, mask, opts)
    assert seen == [(h, False), (1, True)]
    torch.testing.assert_close(expanded, grouped, atol=1e-5, rtol=0)
    sdpa = AttnOptions(packed=True, impl="sdpa")
    torch.testing.assert_close(expanded, attend(q, k, v, attention_mask(packed_positions(b, [23, 17]), sdpa), sdpa), atol=1e-5, rtol=0)
