"""Communication for context parallelism, on ``torch.distributed``: shards, exchanges, a byte counter.

Every rank of a process group holds a contiguous shard of the sequence, in rank
order (:class:`Shards`: lengths may differ).  Two primitives move data, both
differentiable (their backward runs the adjoint communication):

* :func:`exchange` -- point-to-point (``dist.batch_isend_irecv``) transfer of
  position ranges along the sequence dimension, described by a :class:`Plan`.
  Halo exchange (the neighbours' last / first keys), fetching the global keys
  and sending partial results to the owners of their positions are all plans.
  Backward sends the gradient of every received piece back to its owner, which
  adds it to its own gradient.
* :func:`all_gather` -- one ``dist.all_gather`` of equal-shape tensors (the small
  per-rank states of linear attention and S4D); backward all-reduces the
  gradient and keeps the rank's own slot.

:class:`count_bytes` counts what each rank sends (P2P payloads exactly; for a
collective the bytes a ring algorithm sends per rank: ``(P-1)/P`` of the output
for all-gather, ``2 (P-1)/P`` of the tensor for all-reduce).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Shards",
    "Plan",
    "exchange",
    "all_gather",
    "all_reduce_max",
    "count_bytes",
    "ByteCount",
    "plan_fetch",
    "plan_to_owners",
]

Range = Tuple[int, int]


# ------------------------------------------------------------------ counting
@dataclass
class ByteCount:
    """Bytes this rank sent inside a :class:`count_bytes` block, per kind of call."""

    by_kind: Dict[str, int] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


_counters: List[ByteCount] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[ByteCount]:
    """``with count_bytes() as c: ...``: ``c.total`` is the bytes this rank sent (forward and backward)."""
    counter = ByteCount()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _record(kind: str, nbytes: int) -> None:
    for counter in _counters:
        counter.add(kind, nbytes)


# -------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shards:
    """Who holds which positions: rank ``r`` of ``group`` holds ``[starts[r], starts[r] + lengths[r])``."""

    group: Optional[dist.ProcessGroup]
    lengths: Tuple[int, ...]
    rank: int

    @classmethod
    def of(
        cls,
        local_len: int,
        group: Optional[dist.ProcessGroup] = None,
        lengths: Optional[Sequence[int]] = None,
        device=None,
    ) -> "Shards":
        """The shards of ``group``; all-gathers the local lengths (8 bytes a rank) unless ``lengths`` is given."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed initialised (dist.init_process_group)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if lengths is None:
            mine = torch.tensor([int(local_len)], dtype=torch.int64, device=device)
            out = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(out, mine, group=group)
            _record("lengths", 8 * (world - 1))
            lengths = tuple(int(t.item()) for t in out)
        else:
            lengths = tuple(int(x) for x in lengths)
            if len(lengths) != world:
                raise ValueError(f"lengths has {len(lengths)} entries for a group of {world} ranks")
            if lengths[rank] != local_len:
                raise ValueError(f"lengths[{rank}] = {lengths[rank]} but this rank holds {local_len} positions")
        if any(n < 0 for n in lengths):
            raise ValueError(f"shard lengths must be >= 0, got {lengths}")
        return cls(group, lengths, rank)

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def start(self, r: int) -> int:
        return sum(self.lengths[:r])

    def span(self, r: int) -> Range:
        s = self.start(r)
        return s, s + self.lengths[r]

    def global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)


# --------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Plan:
    """One exchange along the sequence dim (``-2``) of a per-rank tensor ``x``.

    ``sends``: ``(peer, start, stop)`` -- send ``x[..., start:stop, :]`` to ``peer``.
    ``recvs``: ``(peer, start, stop)`` in output order -- a piece of ``stop - start``
    positions from ``peer``; for ``peer == rank`` it is the local slice ``x[..., start:stop, :]``.
    Peers are ranks of the group.
    """

    sends: Tuple[Tuple[int, int, int], ...]
    recvs: Tuple[Tuple[int, int, int], ...]


def _intersect(a: Range, b: Range) -> Range:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else (lo, lo)


def plan_fetch(shards: Shards, needs: Sequence[Range]) -> Plan:
    """Rank ``r`` receives positions ``needs[r] = [lo, hi)`` (absolute, in order); owners send their parts."""
    me = shards.rank
    my_span = shards.span(me)
    sends, recvs = [], []
    for r in range(shards.world):
        if r == me:
            continue
        lo, hi = _intersect(needs[r], my_span)
        if hi > lo:
            sends.append((r, lo - my_span[0], hi - my_span[0]))
    for q in range(shards.world):
        span = shards.span(q)
        lo, hi = _intersect(needs[me], span)
        if hi > lo:
            recvs.append((q, lo - span[0], hi - span[0]))
    return Plan(tuple(sends), tuple(recvs))


def plan_to_owners(shards: Shards, positions: Range) -> Plan:
    """Every rank holds a tensor over ``positions = [lo, hi)``; each owner receives, from every rank in
    rank order, the piece over its own positions (the adjoint of fetching ``positions`` everywhere)."""
    me = shards.rank
    lo = positions[0]
    sends, recvs = [], []
    for r in range(shards.world):
        a, b = _intersect(positions, shards.span(r))
        if b > a and r != me:
            sends.append((r, a - lo, b - lo))
    a, b = _intersect(positions, shards.span(me))
    if b > a:
        recvs = [(q, a - lo, b - lo) for q in range(shards.world)]
    return Plan(tuple(sends), tuple(recvs))


# ------------------------------------------------------------------ exchange
def _p2p(shards: Shards, outgoing: List[Tuple[int, Tensor]], incoming: List[Tuple[int, Tensor]], kind: str) -> None:
    ops = []
    for peer, t in outgoing:
        ops.append(dist.P2POp(dist.isend, t, shards.global_rank(peer), group=shards.group))
        _record(kind, t.numel() * t.element_size())
    for peer, t in incoming:
        ops.append(dist.P2POp(dist.irecv, t, shards.global_rank(peer), group=shards.group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shards: Shards, plan: Plan, kind: str) -> Tensor:
        ctx.shards, ctx.plan, ctx.kind, ctx.shape = shards, plan, kind, x.shape
        me = shards.rank
        outgoing = [(peer, x[..., a:b, :].contiguous()) for peer, a, b in plan.sends]
        pieces, incoming = [], []
        for peer, a, b in plan.recvs:
            if peer == me:
                pieces.append(x[..., a:b, :])
            else:
                buf = x.new_empty(*x.shape[:-2], b - a, x.shape[-1])
                incoming.append((peer, buf))
                pieces.append(buf)
        _p2p(shards, outgoing, incoming, kind)
        if not pieces:
            return x.new_empty(*x.shape[:-2], 0, x.shape[-1])
        return torch.cat(pieces, dim=-2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shards, plan, me = ctx.shards, ctx.plan, ctx.shards.rank
        grad_x = grad.new_zeros(ctx.shape)
        outgoing, pos = [], 0
        for peer, a, b in plan.recvs:
            piece = grad[..., pos : pos + b - a, :]
            pos += b - a
            if peer == me:
                grad_x[..., a:b, :] += piece
            else:
                outgoing.append((peer, piece.contiguous()))
        incoming = [(peer, grad.new_empty(*ctx.shape[:-2], b - a, ctx.shape[-1])) for peer, a, b in plan.sends]
        _p2p(shards, outgoing, incoming, ctx.kind + "_grad")
        for (_, a, b), (_, g) in zip(plan.sends, incoming):
            grad_x[..., a:b, :] += g
        return grad_x, None, None, None


def exchange(x: Tensor, shards: Shards, plan: Plan, kind: str = "p2p") -> Tensor:
    """Run ``plan`` on ``x (..., L_local, F)``; returns the received pieces concatenated along dim ``-2``.

    Differentiable: the gradient of each received piece goes back to the rank that sent it.
    Bool tensors travel as uint8 (not every backend sends bools).
    """
    if x.dtype == torch.bool:
        return _Exchange.apply(x.to(torch.uint8), shards, plan, kind).bool()
    return _Exchange.apply(x, shards, plan, kind)


# ---------------------------------------------------------------- all-gather
class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shards: Shards) -> Tensor:
        ctx.shards = shards
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(shards.world)]
        dist.all_gather(out, x, group=shards.group)
        _record("all_gather", x.numel() * x.element_size() * (shards.world - 1))
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shards = ctx.shards
        grad = grad.contiguous()
        dist.all_reduce(grad, group=shards.group)
        _record("all_reduce", 2 * grad.numel() * grad.element_size() * (shards.world - 1) // shards.world)
        return grad[shards.rank], None


def all_gather(x: Tensor, shards: Shards) -> Tensor:
    """``(world, *x.shape)``: every rank's ``x`` (same shape everywhere); differentiable."""
    return _AllGather.apply(x, shards)


def all_reduce_max(x: Tensor, shards: Shards) -> Tensor:
    """Elementwise max over the ranks (not differentiable: for stabilisers)."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=shards.group)
    _record("all_reduce", 2 * x.numel() * x.element_size() * (shards.world - 1) // shards.world)
    return x
