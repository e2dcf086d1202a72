"""Sequence parallelism (DeepSpeed Ulysses) around our own attention call.

A `seq` group of N ranks holds one row each as N contiguous slices of S/N tokens: every layer
but attention is per token, so it runs on the slice unchanged (rotary included: it reads the
slice's own position ids). Attention needs every key: `attend` all-to-alls q, k, v (and an
ALiBi bias) from [B, H, S/N, D] (all heads, my tokens) to [B, H/N, S, D] (my heads, all tokens),
runs the ordinary attention there (flex with the document BlockMask, SDPA, eager: the mask is
built from the whole row's positions, `gather_positions`), and all-to-alls the output back.

The exchange is DeepSpeed's own compile-safe operator `deepspeed::dim_zero_all_to_all`
(deepspeed.sequence.layer, 0.19.8: a torch.library op with a registered backward). DeepSpeed's
`_SeqAllToAll` is an autograd.Function filling a buffer through a collective, which
torch.compile inlines into a graph whose output does not depend on its input: silently zero
gradients (DeepSpeed PR #8491); the operator is opaque to the tracer and carries its derivative.
The group is registered by name (`register_all_to_all_group`) once, outside compiled code.

GQA: a rank must hold the KV heads of its query heads. When N does not divide the KV head
count (chatglm3 has 2), the KV heads are repeated (repeat_interleave, which keeps each query
group next to its KV head) up to the smallest count N divides; backward sums the copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class SeqGroup:
    """This rank's sequence-parallel group: `size` ranks, this one's index `rank` in it (its slice
    of every row), the torch.distributed group and its name in DeepSpeed's all-to-all registry.
    Compared by identity (one object per run), so AttnOptions holding it stays a cheap cache key."""

    group: object
    size: int
    rank: int
    name: str

    @classmethod
    def of(cls, group) -> "SeqGroup":
        import torch.distributed as dist
        from deepspeed.sequence.layer import register_all_to_all_group

        return cls(group, dist.get_world_size(group), dist.get_rank(group), register_all_to_all_group(group))


def new_groups(world_size: int, seq: int) -> list[list[int]]:
    """Global ranks of each seq group when the seq axis is innermost ([pipe, data, seq]): N
    consecutive ranks. Every rank must create every group, in this order (torch.distributed)."""
    return [list(range(start, start + seq)) for start in range(0, world_size, seq)]


def make_group(world_size: int, seq: int) -> SeqGroup | None:
    """Create the run's seq groups (collective: every rank calls it) and return this rank's; None for seq 1."""
    import torch.distributed as dist

    if seq <= 1:
        return None
    mine = None
    for ranks in new_groups(world_size, seq):
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return SeqGroup.of(mine)


def _exchange(x: torch.Tensor, seq: SeqGroup) -> torch.Tensor:
    """All-to-all over dim 0 (size N): chunk j goes to rank j, chunk j of the result came from rank j."""
    return torch.ops.deepspeed.dim_zero_all_to_all(x.contiguous(), seq.name)


def scatter_heads(x: torch.Tensor, seq: SeqGroup) -> torch.Tensor:
    """[B, H, S/N, D] -> [B, H/N, S, D]: my heads, every rank's tokens in rank order."""
    b, h, s, d = x.shape
    n = seq.size
    out = _exchange(x.view(b, n, h // n, s, d).transpose(0, 1), seq)  # [N (token slice), B, H/N, S/N, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def gather_heads(out: torch.Tensor, seq: SeqGroup) -> torch.Tensor:
    """Attention's output [B, S, H/N*D] -> [B, S/N, H*D]: my tokens, every rank's heads in rank order."""
    b, s, hd = out.shape
    n = seq.size
    back = _exchange(out.view(b, n, s // n, hd).transpose(0, 1), seq)  # [N (head group), B, S/N, H/N*D]
    return back.permute(1, 2, 0, 3).reshape(b, s // n, n * hd)


def kv_copies(n_kv: int, n_heads: int, n: int) -> int:
    """How many times each KV head is repeated so that N ranks split the KV heads with their query
    groups: the smallest m dividing H/Hkv with N | Hkv * m."""
    rep = n_heads // n_kv
    for m in range(1, rep + 1):
        if rep % m == 0 and (n_kv * m) % n == 0:
            return m
    raise ValueError(f"{n_heads} query / {n_kv} key-value heads cannot be split over {n} sequence ranks")


def attend(q, k, v, mask, opts, bias, scale, seq: SeqGroup, local_attend):
    """`local_attend(q, k, v, mask, opts, bias, scale)` (models.attention.local_attend) on
    my heads over the whole row; q [B, H, S/N, D], k/v [B, Hkv, S/N, D], bias [B, H, 1, S/N]
    (ALiBi: slope x key position, each key's value travels with its key) or None; mask built from
    the whole row (attention_mask). Returns [B, S/N, H*D] as attend does."""
    n_kv, h = k.shape[1], q.shape[1]
    m = kv_copies(n_kv, h, seq.size) if n_kv % seq.size else 1
    if m > 1:
        k, v = k.repeat_interleave(m, dim=1), v.repeat_interleave(m, dim=1)
    q, k, v = (scatter_heads(t, seq) for t in (q, k, v))
    if bias is not None:  # [B, H, 1, S/N] -> [B, H/N, 1, S]: a key-like tensor of head dim 1
        bias = scatter_heads(bias.expand(q.shape[0], h, 1, bias.shape[-1]).transpose(2, 3), seq).transpose(2, 3)
    out = local_attend(q, k, v, mask, opts, bias, scale)
    return gather_heads(out, seq)


# ----------------------------------------------------------------------------- whole-row values
def gather_positions(x: torch.Tensor, seq: SeqGroup) -> torch.Tensor:
    """The whole rows [B, S] of an integer tensor (position ids, token ids) from each rank's slice
    [B, S/N] (no gradient: masks, padding). Runs outside compiled code, once per micro-batch."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(seq.size)]
    dist.all_gather(parts, x.contiguous(), group=seq.group)
    return torch.cat(parts, dim=1)


def local_slice(x: torch.Tensor, seq: SeqGroup, dim: int = 1) -> torch.Tensor:
    """My slice of a whole-row tensor along `dim`."""
    s = x.shape[dim] // seq.size
    return x.narrow(dim, seq.rank * s, s)


def sum_over(x: torch.Tensor, seq: SeqGroup) -> torch.Tensor:
    """Sum of a (detached) tensor over the seq group."""
    import torch.distributed as dist

    x = x.detach().clone()
    dist.all_reduce(x, group=seq.group)
    return x


def group_value(local: torch.Tensor, seq: SeqGroup | None) -> torch.Tensor:
    """A loss term whose value is the seq group's mean of `local` and whose gradient is `local`'s:
    each rank's term is its share of a quantity over the whole row (its tokens' part, already
    weighted as the whole row's mean would weigh them), so the sum of the ranks' gradients is the
    whole row's; the value logged and added to the loss is the same on every rank of the group."""
    if seq is None:
        return local
    mean = sum_over(local, seq) / seq.size
    return mean + (local - local.detach())


def check_divisible(what: str, value: int, n: int, align: int = 1) -> str | None:
    """None, or why `value` (heads, max_seq_len) does not split over n ranks (x align)."""
    unit = n * align
    if value % unit:
        return f"{what} {value} is not divisible by seq {n}" + (f" x {align}" if align > 1 else "")
    return None


def kv_heads_ok(n_kv: int, n_heads: int, n: int) -> bool:
    try:
        kv_copies(n_kv, n_heads, n)
        return True
    except ValueError:
        return False

