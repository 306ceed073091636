"""A block mask: which ``bs x bs`` blocks of the score matrix are computed, and how.

The idea of FlexAttention's ``BlockMask``, in our own terms.  Every kept block of
a per-head layout is either

* **full**: every (query, key) pair of the block is attended (the kernels skip
  the element mask), or
* **partial**: a token-level rule decides inside the block.  Two rules exist,
  both evaluated inside the kernels: the *causal* rule ``j <= i + S - T``
  (``causal=True``; it costs nothing on blocks below the diagonal) and a dense
  bool *tile* ``(bs, bs)`` per block for any other token mask (tiles are
  deduplicated: a regular pattern has a handful of distinct ones).

Built once, a mask carries the sorted per-row and per-column block tables that
every backend reads (:meth:`BlockMask.tables`).  Constructors:
:meth:`BlockMask.from_layout` (a bool block layout), :meth:`BlockMask.from_mask_mod`
(a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True = attend)
and :meth:`BlockMask.from_pattern` (every named layout of
:mod:`efficient_attention.layouts`).  ``to_mask()`` is the dense token mask
(for tests); ``print(mask)`` shows the sparsity and a small picture.

Token masks may depend on the head, not on the batch item (key padding is
passed to the attention call separately).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

import torch
from torch import Tensor

from . import layouts
from .layouts import MaskMod

__all__ = ["BlockMask", "as_block_mask"]

_EVAL_ELEMENTS = 1 << 24  # mask_mod entries evaluated at a time when building from a mask_mod


def _int_arg(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


# Triton computes blocks of 64 best; finer masks run as 64-blocks with token tiles (FlexAttention's way)
TRITON_MIN_BLOCK = 64

Builder = TypeVar("Builder", bound=Callable[..., Any])


def built_outside_graph(build: Builder) -> Builder:
    """For a cached builder of block masks (its arguments constants: ints, devices, the module): under
    torch.compile the first call of a trace runs ``build`` on the host, outside the graph, filling its cache and
    every table the kernels read (:meth:`BlockMask.prepare`); the traced call then finds them cached, as in a step
    after an eager one.  Traced, the build (a mask's evaluation, its sorted tables) is data-dependent, so a model
    compiled before any eager step failed on its first call.  Eagerly it is ``build``."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            _build_now(build, tuple(kwargs.items()), *args)
        return build(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@torch.compiler.assume_constant_result  # run once at trace time, not traced
def _build_now(build: Callable[..., Any], kwargs: tuple, *args) -> bool:
    out = build(*args, **dict(kwargs))
    for bm in out if isinstance(out, tuple) else (out,):
        if isinstance(bm, BlockMask):
            bm.prepare()
    return True


def _table(layout: Tensor, tile_index: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per layout row: the kept column indices first, ascending (int32), their count, and the tile of each."""
    cnt = layout.sum(-1, dtype=torch.int32).contiguous()
    idx = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices
    tile = None if tile_index is None else tile_index.gather(-1, idx).to(torch.int32).contiguous()
    return idx.to(torch.int32).contiguous(), cnt, tile


def _causal_tile(bs: int, qb: Tensor, kb: Tensor, offset: int, device) -> Tensor:
    """``(n, bs, bs)``: the causal rule ``j <= i + offset`` inside blocks ``(qb[n], kb[n])``."""
    r = torch.arange(bs, device=device)
    i = qb.view(-1, 1, 1) * bs + r.view(1, -1, 1)
    j = kb.view(-1, 1, 1) * bs + r.view(1, 1, -1)
    return j <= i + offset


class BlockMask:
    """Kept blocks of a per-head layout, split into full and partial blocks (see the module docstring).

    Attributes:
        layout: bool ``(Hm, nq, nk)``, ``Hm`` = 1 (shared by all heads) or H: the kept blocks.
        block_size: ``bs``.
        causal: the kernels' causal rule ``j <= i + S - T`` applies on top of every block.
        tile_index: int32 ``(Hm, nq, nk)`` or None: ``-1`` = no tile, else the index of the block's tile.
        tiles: bool ``(P, bs, bs)`` or None: token masks of the partial blocks (True = attend).
        q_len, kv_len: token lengths the mask was built for (None: any lengths with these block counts).
    """

    def __init__(
        self,
        layout: Tensor,
        block_size: int,
        *,
        causal: bool = False,
        tile_index: Optional[Tensor] = None,
        tiles: Optional[Tensor] = None,
        q_len: Optional[int] = None,
        kv_len: Optional[int] = None,
    ):
        self.block_size = _int_arg(block_size, "block_size")
        self.layout = layouts.as_layout(layout)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        if (tile_index is None) != (tiles is None):
            raise ValueError("tile_index and tiles must be given together")
        if tile_index is not None and tiles is not None:  # both or neither, checked above
            if tile_index.shape != self.layout.shape or tile_index.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"tile_index must be an int32 tensor of the layout's shape "
                    f"{tuple(self.layout.shape)}, "
                    f"got {tile_index.dtype} {tuple(tile_index.shape)}"
                )
            if tiles.dim() != 3 or tiles.shape[1:] != (self.block_size, self.block_size) or tiles.dtype != torch.bool:
                raise ValueError(
                    f"tiles must be bool (P, {self.block_size}, {self.block_size}), "
                    f"got {tiles.dtype} {tuple(tiles.shape)}"
                )
            if tiles.shape[0] == 0:
                tile_index = tiles = None
            else:
                tile_index = torch.where(self.layout, tile_index, -1).to(torch.int32)
        self.tile_index, self.tiles = tile_index, tiles
        self.q_len, self.kv_len = q_len, kv_len
        self._tables: Dict[Any, Any] = {}  # derived tables (by device) and coarsened masks, built once

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_layout(cls, layout: Tensor, block_size: int, causal: bool = False) -> "BlockMask":
        """Every kept block full (partial on the diagonal when ``causal``)."""
        return cls(layout, block_size, causal=bool(causal))

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskMod,
        heads: int,
        q_len: int,
        kv_len: Optional[int] = None,
        block_size: int = 64,
        *,
        device=None,
        q_block_start: int = 0,
        candidates: Optional[Tensor] = None,
    ) -> "BlockMask":
        """The block mask of a token rule ``mask_mod(b, h, q_idx, kv_idx)`` (True = attend; b is 0).

        Blocks with no attended entry are dropped; blocks whose entries all follow the causal rule
        (when the whole mask is causal) are full or causal-partial; the rest get a tile.  With
        ``q_block_start`` only the query-block rows from there on are built (decoding).  ``candidates``
        (bool ``(H or 1, nq, nk)``, or only its rows from ``q_block_start`` on), when given, is a superset of
        the kept blocks: only those are evaluated.
        """
        heads = _int_arg(heads, "heads")
        bs = _int_arg(block_size, "block_size")
        q_len = _int_arg(q_len, "q_len")
        kv_len = q_len if kv_len is None else _int_arg(kv_len, "kv_len")
        nq, nk = -(-q_len // bs), -(-kv_len // bs)
        offset = kv_len - q_len
        rows_total = nq - q_block_start
        h = torch.arange(heads, device=device).view(-1, 1, 1)
        zero = torch.zeros((), dtype=torch.long, device=device)
        if candidates is not None:
            candidates = layouts.as_layout(candidates).to(device)
            if candidates.shape[-2] != nq - q_block_start:
                candidates = candidates[:, q_block_start:]
            candidates = candidates.expand(heads, nq - q_block_start, nk)
        per_row = max(1, _EVAL_ELEMENTS // max(1, heads * bs * bs * nk))
        chunks = [(r0, min(rows_total, r0 + per_row)) for r0 in range(0, rows_total, per_row)]

        def evaluate(r0, r1):
            """Rows r0..r1 on their candidate key blocks ``cols`` (all when no candidates):
            (mask (H, R*bs, C*bs), blocks (H, R, C, bs, bs), valid blocks (1, R, C, bs, bs), q pos, k pos, cols)."""
            cols = torch.arange(nk, device=device)
            if candidates is not None:
                cols = candidates[:, r0:r1].any(0).any(0).nonzero().flatten()
            qpos = torch.arange((q_block_start + r0) * bs, (q_block_start + r1) * bs, device=device).view(1, -1, 1)
            kpos = (cols.view(-1, 1) * bs + torch.arange(bs, device=device)).view(1, 1, -1)
            valid = (qpos < q_len) & (kpos < kv_len)
            m = mask_mod(zero, h, qpos, kpos).expand(heads, qpos.shape[1], kpos.shape[2]) & valid
            if candidates is not None:
                m = m & candidates[:, r0:r1][:, :, cols].repeat_interleave(bs, 1).repeat_interleave(bs, 2)
            c = cols.numel()
            blocks = m.view(heads, r1 - r0, bs, c, bs).transpose(2, 3)
            return m, blocks, valid.view(1, r1 - r0, bs, c, bs).transpose(2, 3), qpos, kpos, cols

        # pass 1: kept blocks, and whether the whole mask obeys the causal rule (then the kernels apply it)
        keep = torch.zeros(heads, rows_total, nk, dtype=torch.bool, device=device)
        causal_ok = True
        for r0, r1 in chunks:
            m, blocks, _, qpos, kpos, cols = evaluate(r0, r1)
            causal_ok = causal_ok and not bool((m & (kpos > qpos + offset)).any())
            keep[:, r0:r1, cols] = blocks.any(-1).any(-1)
        # pass 2: kept blocks differing from "every valid entry" (under the causal rule) get a tile
        tile_index = torch.full(keep.shape, -1, dtype=torch.int64, device=device)
        uniq, inv, where = [], [], []
        for r0, r1 in chunks:
            _, blocks, valid, _, _, cols = evaluate(r0, r1)
            rule = valid.expand_as(blocks)
            rows, c = r1 - r0, cols.numel()
            if causal_ok:
                qb = torch.arange(q_block_start + r0, q_block_start + r1, device=device).view(-1, 1).expand(rows, c)
                kb = cols.view(1, -1).expand(rows, c)
                rule = rule & _causal_tile(bs, qb.flatten(), kb.flatten(), offset, device).view(1, rows, c, bs, bs)
            need = (blocks != rule).flatten(3).any(-1) & keep[:, r0:r1][:, :, cols]
            if bool(need.any()):
                u, i = torch.unique(blocks[need].flatten(1).to(torch.uint8), dim=0, return_inverse=True)
                need_full = torch.zeros(heads, rows, nk, dtype=torch.bool, device=device)
                need_full[:, :, cols] = need  # cols ascend: the row-major order of blocks[need] is kept
                uniq.append(u)
                inv.append(i)
                where.append((r0, r1, need_full))
        tiles = None
        if uniq:
            allu, remap = torch.unique(torch.cat(uniq), dim=0, return_inverse=True)
            start = 0
            for u, i, (r0, r1, need) in zip(uniq, inv, where):
                part = tile_index[:, r0:r1]
                part[need] = remap[start + i]
                start += u.shape[0]
            tiles = allu.view(-1, bs, bs).bool()
        index = tile_index.to(torch.int32) if tiles is not None else None
        bm = cls(
            keep, bs, causal=causal_ok, tile_index=index, tiles=tiles, q_len=q_len - q_block_start * bs, kv_len=kv_len
        )
        return bm._shared_heads()

    @classmethod
    def from_pattern(
        cls,
        pattern: str,
        n: int,
        block_size: int,
        heads: int,
        *,
        causal: bool = False,
        device=None,
        q_block_start: int = 0,
        **kw,
    ) -> "BlockMask":
        """A named layout of :data:`efficient_attention.layouts.PATTERNS` for ``n`` positions.

        Block-level patterns (``random``, ``bigbird``) keep whole blocks (causal on the diagonal);
        token-level ones are exact (``kw`` as for :func:`layouts.make_mask_mod` / :func:`layouts.make_layout`).
        """
        if pattern in layouts.BLOCK_LEVEL_PATTERNS:  # only the rows asked for are built (decoding: one row)
            lay = layouts.make_layout(pattern, n, block_size, heads, causal=causal, first_row=q_block_start, **kw)
            return cls(lay.to(device), block_size, causal=bool(causal), q_len=n - q_block_start * block_size, kv_len=n)
        mod = layouts.make_mask_mod(pattern, heads=heads, block_size=block_size, causal=causal, **kw)
        candidates = None
        if pattern == "fixed" and causal:  # its exact block support: skip evaluating the empty blocks
            candidates = layouts.fixed_layout(
                heads,
                -(-n // block_size),
                kw.get("local_attn_ctx", 64),
                block_size,
                kw.get("num_verts", 1),
                kw.get("vertsize", 1),
                first_row=q_block_start,
            )
        return cls.from_mask_mod(
            mod, heads, n, n, block_size, device=device, q_block_start=q_block_start, candidates=candidates
        )

    # ------------------------------------------------------------------ views
    @property
    def heads(self) -> int:
        return self.layout.shape[0]

    @property
    def shape(self) -> Tuple[int, int]:
        """``(n_q_blocks, n_k_blocks)``."""
        return self.layout.shape[1], self.layout.shape[2]

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def partial_blocks(self) -> Tensor:
        """bool ``(Hm, nq, nk)``: kept blocks with a token rule inside (a tile, or the causal diagonal)."""
        part = self.layout & (self.tile_index >= 0) if self.tile_index is not None else torch.zeros_like(self.layout)
        if self.causal:
            nq, nk = self.shape
            off = self._causal_offset()
            qb = torch.arange(nq, device=self.device).view(-1, 1)
            kb = torch.arange(nk, device=self.device).view(1, -1)
            # block (qb, kb) is cut by j <= i + off unless its last key <= its first query + off
            diag = (kb + 1) * self.block_size - 1 > qb * self.block_size + off
            part = part | (self.layout & diag)
        return part

    def full_blocks(self) -> Tensor:
        """bool ``(Hm, nq, nk)``: kept blocks computed without any element mask."""
        return self.layout & ~self.partial_blocks()

    def _causal_offset(self) -> int:
        if self.q_len is not None and self.kv_len is not None:
            return self.kv_len - self.q_len
        return (self.shape[1] - self.shape[0]) * self.block_size

    def sparsity(self) -> float:
        """Fraction of the ``nq x nk`` blocks (per head) that are not computed."""
        return 1.0 - self.layout.float().mean().item() if self.layout.numel() else 1.0

    def rows(self, start: int, stop: Optional[int] = None) -> "BlockMask":
        """The query-block rows ``start .. stop`` (tiles shared; for decoding the last rows)."""
        stop = self.shape[0] if stop is None else stop
        ti = None if self.tile_index is None else self.tile_index[:, start:stop]
        q_len = None
        if self.q_len is not None:
            q_len = (self.q_len if stop >= self.shape[0] else stop * self.block_size) - start * self.block_size
        return BlockMask(
            self.layout[:, start:stop],
            self.block_size,
            causal=self.causal,
            tile_index=ti,
            tiles=self.tiles,
            q_len=q_len,
            kv_len=self.kv_len,
        )

    def crop(self, n: int) -> "BlockMask":
        """The first ``n`` positions of a square (self-attention) mask whose rule depends on the positions
        only, not on the length (every token pattern of :mod:`efficient_attention.layouts`): the mask a
        sequence of ``n`` has, without evaluating the rule again (no host synchronisation).  Blocks cut by
        the end keep their entries past ``n``; the kernels never read keys past the sequence."""
        n = _int_arg(n, "n")
        if self.q_len is None or self.q_len != self.kv_len or self.shape[0] != self.shape[1]:
            raise ValueError(
                f"crop needs a square mask built for a length, got q_len={self.q_len}, kv_len={self.kv_len}"
            )
        if n > self.q_len:
            raise ValueError(f"crop: n={n} is longer than the mask's {self.q_len} positions")
        if n == self.q_len:
            return self
        nb = -(-n // self.block_size)
        return BlockMask(
            self.layout[:, :nb, :nb],
            self.block_size,
            causal=self.causal,
            tile_index=None if self.tile_index is None else self.tile_index[:, :nb, :nb],
            tiles=self.tiles,
            q_len=n,
            kv_len=n,
        )

    def with_causal(self) -> "BlockMask":
        """This mask with the kernels' causal rule on top (itself when it has it)."""
        if self.causal:
            return self
        return BlockMask(
            self.layout,
            self.block_size,
            causal=True,
            tile_index=self.tile_index,
            tiles=self.tiles,
            q_len=self.q_len,
            kv_len=self.kv_len,
        )

    def to(self, device) -> "BlockMask":
        device = torch.device(device)
        if self.device == device:
            return self
        return BlockMask(
            self.layout.to(device),
            self.block_size,
            causal=self.causal,
            tile_index=None if self.tile_index is None else self.tile_index.to(device),
            tiles=None if self.tiles is None else self.tiles.to(device),
            q_len=self.q_len,
            kv_len=self.kv_len,
        )

    def expand_heads(self, heads: int) -> "BlockMask":
        """The same mask with ``heads`` explicit head rows (a shared mask repeated)."""
        if self.heads == heads:
            return self
        ti = None if self.tile_index is None else self.tile_index.expand(heads, -1, -1).contiguous()
        return BlockMask(
            self.layout.expand(heads, -1, -1).contiguous(),
            self.block_size,
            causal=self.causal,
            tile_index=ti,
            tiles=self.tiles,
            q_len=self.q_len,
            kv_len=self.kv_len,
        )

    def _shared_heads(self) -> "BlockMask":
        """Collapse identical heads to one shared layout row set."""
        if (
            self.heads > 1
            and bool((self.layout == self.layout[:1]).all())
            and (self.tile_index is None or bool((self.tile_index == self.tile_index[:1]).all()))
        ):
            return BlockMask(
                self.layout[:1],
                self.block_size,
                causal=self.causal,
                tile_index=None if self.tile_index is None else self.tile_index[:1],
                tiles=self.tiles,
                q_len=self.q_len,
                kv_len=self.kv_len,
            )
        return self

    def coarsen(self, block_size: int) -> "BlockMask":
        """The same token mask on blocks of ``block_size`` (a multiple of ours): the finer structure
        becomes tiles (how FlexAttention runs fine masks on large kernel blocks)."""
        f = _int_arg(block_size, "block_size") // self.block_size
        if f * self.block_size != block_size:
            raise ValueError(f"block_size {block_size} must be a multiple of {self.block_size}")
        if f == 1:
            return self
        hm, (nq, nk), bs = self.heads, self.shape, self.block_size
        cq, ck = -(-nq // f), -(-nk // f)
        pad = (0, ck * f - nk, 0, cq * f - nq)
        lay = torch.nn.functional.pad(self.layout, pad, value=False)
        ti = torch.full_like(self.layout, -1, dtype=torch.int32) if self.tile_index is None else self.tile_index
        ti = torch.nn.functional.pad(ti, pad, value=-1)
        # fine blocks past the end count as full: their tokens are outside the sequence
        outside = torch.nn.functional.pad(torch.zeros_like(self.layout), pad, value=True)
        view = (hm, cq, f, ck, f)
        keep = lay.view(view).any(4).any(2)
        full = ((lay | outside) & (ti < 0)).view(view).all(4).all(2)
        need = keep & ~full
        tile_index = tiles = None
        if bool(need.any()):
            sub_lay = lay.view(view).permute(0, 1, 3, 2, 4)[need]  # (P, f, f)
            sub_ti = ti.view(view).permute(0, 1, 3, 2, 4)[need].long()
            own = torch.ones(1, bs, bs, dtype=torch.bool, device=self.device)
            src = own if self.tiles is None else torch.cat([own, self.tiles.to(self.device)])
            tok = src[(sub_ti + 1).clamp(min=0)] & sub_lay[..., None, None]  # (P, f, f, bs, bs)
            tok = tok.permute(0, 1, 3, 2, 4).reshape(-1, f * bs * f * bs)
            uniq, inv = torch.unique(tok.to(torch.uint8), dim=0, return_inverse=True)
            tile_index = torch.full(keep.shape, -1, dtype=torch.int32, device=self.device)
            tile_index[need] = inv.to(torch.int32)
            tiles = uniq.view(-1, f * bs, f * bs).bool()
        return BlockMask(
            keep,
            block_size,
            causal=self.causal,
            tile_index=tile_index,
            tiles=tiles,
            q_len=self.q_len,
            kv_len=self.kv_len,
        )

    def coarsened(self, block_size: int) -> "BlockMask":
        """:meth:`coarsen`, computed once per mask and block size."""
        key = f"coarse{block_size}"
        if key not in self._tables:
            self._tables[key] = self.coarsen(block_size)
        return self._tables[key]

    def to_mask(self, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> Tensor:
        """Dense bool ``(Hm, T, S)`` token mask, True = attend (for tests and small inputs)."""
        bs = self.block_size
        nq, nk = self.shape
        q_len = q_len or self.q_len or nq * bs
        kv_len = kv_len or self.kv_len or nk * bs
        dense = self.layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2)
        if self.tile_index is not None and self.tiles is not None:
            ti = self.tile_index.long()
            tiled = self.tiles[ti.clamp(min=0)]  # (Hm, nq, nk, bs, bs)
            tiled = tiled | (ti < 0)[..., None, None]
            dense = dense & tiled.transpose(2, 3).reshape(self.heads, nq * bs, nk * bs)
        dense = dense[:, :q_len, :kv_len]
        if self.causal:
            i = torch.arange(q_len, device=self.device).view(-1, 1)
            j = torch.arange(kv_len, device=self.device).view(1, -1)
            dense = dense & (j <= i + kv_len - q_len)
        return dense

    # ------------------------------------------------------------------ kernels' tables
    def prepare(self) -> "BlockMask":
        """Build now every table a kernel may read on this mask's device (also the coarsening to the Triton
        kernels' smallest block, which finer masks run as): what :func:`built_outside_graph` leaves cached."""
        self.tables(self.device)  # (kept under the device and its name: the C++ backend asks for "cpu")
        if self.block_size < TRITON_MIN_BLOCK:
            self.coarsened(TRITON_MIN_BLOCK).prepare()
        return self

    def tables(self, device=None) -> dict:
        """The sorted block tables the kernels read, built once per device.

        ``row``: ``(idx (Hm, nq, nk) int32 kept columns first ascending, cnt (Hm, nq) int32, tile
        (Hm, nq, nk) int32 or None)``; ``col``: the same for the transposed layout (query blocks per key
        block, for the dk/dv pass); ``tiles``: uint8 ``(P, bs, bs)`` or None; ``kernel``: all of them flat, in
        the order :func:`efficient_attention.kernels.ops.block_sparse_kernel` takes them.
        """
        hit = self._tables.get(device)  # a training step asks with the same device object kind every time
        if hit is not None:
            return hit
        dev = torch.device(device) if device is not None else self.device
        key = str(dev)
        hit = self._tables.get(key)
        if hit is None:
            lay = self.layout.to(dev)
            ti = None if self.tile_index is None else self.tile_index.to(dev)
            hit = dict(
                row=_table(lay, ti),
                col=_table(lay.transpose(1, 2), None if ti is None else ti.transpose(1, 2)),
                tiles=None if self.tiles is None else self.tiles.to(device=dev, dtype=torch.uint8).contiguous(),
            )
            hit["kernel"] = (*hit["row"], *hit["col"], hit["tiles"])  # the kernels' argument order
            self._tables[key] = hit
        if device is not None:
            self._tables[device] = hit
        return hit

    def check(self, heads: int, q_len: int, kv_len: int) -> "BlockMask":
        """Raise ``ValueError`` naming what does not fit ``heads`` query heads, ``q_len`` x ``kv_len`` tokens."""
        bs = self.block_size
        nq, nk = -(-q_len // bs), -(-kv_len // bs)
        if self.heads not in (1, heads) or self.shape != (nq, nk):
            what = "head count" if self.shape == (nq, nk) else "shape or block_size"
            raise ValueError(
                f"layout must have shape ({heads} or 1, {nq}, {nk}) for {heads} heads, {q_len} queries "
                f"and {kv_len} keys in blocks of {bs}; got {tuple(self.layout.shape)} (wrong {what})"
            )
        return self

    # ------------------------------------------------------------------ printing / pickling
    def __repr__(self) -> str:
        nq, nk = self.shape
        full = int(self.full_blocks().sum())
        part = int(self.layout.sum()) - full
        ntiles = 0 if self.tiles is None else self.tiles.shape[0]
        head = (
            f"BlockMask(heads={self.heads}, blocks={nq}x{nk} of {self.block_size}, sparsity={self.sparsity():.1%}, "
            f"full={full}, partial={part}, tiles={ntiles}, causal={self.causal})"
        )
        if nq > 24 or nk > 48:
            return head
        part_m = self.partial_blocks()
        pic = []
        for h in range(min(self.heads, 2)):
            rows = [
                "".join("#" if f else ("+" if p else ".") for f, p in zip(fr, pr))
                for fr, pr in zip(self.full_blocks()[h].tolist(), part_m[h].tolist())
            ]
            pic.append(f"head {h}:\n" + "\n".join(rows))
        return head + "\n" + "\n".join(pic) + "\n(# full, + partial, . skipped)"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state


def as_block_mask(
    mask, heads: int, q_len: int, kv_len: int, block_size: Optional[int] = None, causal: bool = False
) -> BlockMask:
    """The one validator: a :class:`BlockMask` or a bool/0-1 layout tensor -> a checked BlockMask.

    Wrong shape, block size, head count or dtype raise ``ValueError`` naming them.
    """
    if isinstance(mask, BlockMask):
        if block_size is not None and int(block_size) != mask.block_size:
            raise ValueError(f"block_size {block_size} differs from the block mask's {mask.block_size}")
        bm = mask.with_causal() if causal else mask
    elif isinstance(mask, Tensor):
        if block_size is None:
            raise ValueError("block_size is needed with a layout tensor")
        bs = _int_arg(block_size, "block_size")
        if mask.dim() not in (2, 3):
            raise ValueError(f"layout must be 2-D or 3-D (heads, q_blocks, k_blocks), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
            raise ValueError(f"layout must be bool or hold only 0/1 integers, got dtype {mask.dtype}")
        bm = BlockMask.from_layout(mask, bs, causal=bool(causal))
    else:
        raise TypeError(f"layout must be a BlockMask or a bool Tensor, got {type(mask).__name__}")
    return bm.check(heads, q_len, kv_len)
