"""Sparsity patterns as data: token-level ``mask_mod`` functions and block layouts.

Two views of one pattern:

* a **mask_mod** ``mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention style,
  **True = attend**), evaluated on broadcasting index tensors; it is the exact,
  token-level definition of the pattern;
* a **block layout** ``(H, ceil(N/bs), ceil(N/bs))`` bool: True where a
  ``bs x bs`` block holds at least one attended entry -- the blocks the sparse
  kernels compute (:func:`layout_from_mask_mod`).

Patterns (``i`` = query position, ``j`` = key position, ``h`` = head):

=============  ==============================================================
``all``        every ``j`` (``j <= i`` when causal)
``local``      OpenAI's ``local``: ``i - local_attn_ctx < j <= i`` (causal),
               ``|i - j| < local_attn_ctx`` otherwise
``sliding``    :class:`LocalWindow` ``i - left <= j <= i + right``
``strided``    ``(i - j) mod l == 0`` and ``j <= i``
``fixed``      ``j // l == i // l`` or ``j mod l`` in head ``h``'s summary
               columns ``[l - c(g+1), l - c g)``, ``g = h mod num_verts``; ``j <= i``
``dilated``    LongNet: same segment of length ``w`` and both ``i``, ``j`` at
               offset ``h mod r`` modulo ``r`` inside it
``global``     ``i`` or ``j`` is one of the global positions
``random``     seeded random key blocks per (head, query block) -- block level
``bigbird``    window blocks + global blocks + random blocks -- block level
user layouts   any bool ``(H or 1, nq, nk)`` tensor (:func:`layout_mask_mod`)
=============  ==============================================================

:func:`create_mask` materialises a mask_mod densely (for tests and small
inputs); :func:`format_layout` prints a layout.  Block sizes 16, 32, 64 and 128
are the supported ones (:data:`BLOCK_SIZES`), any positive size works.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .local_window import LocalWindow

__all__ = [
    "BLOCK_SIZES",
    "MaskMod",
    "create_mask",
    "and_masks",
    "or_masks",
    "causal_mask_mod",
    "all_mask_mod",
    "local_mask_mod",
    "sliding_window_mask_mod",
    "strided_mask_mod",
    "fixed_mask_mod",
    "dilated_mask_mod",
    "global_mask_mod",
    "layout_mask_mod",
    "as_layout",
    "layout_from_mask_mod",
    "expand_layout",
    "random_layout",
    "bigbird_layout",
    "fixed_layout",
    "make_layout",
    "make_mask_mod",
    "format_layout",
    "PATTERNS",
]

BLOCK_SIZES = (16, 32, 64, 128)
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _pos_int(value, name: str, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} integer, got {value!r}")
    return value


# ---------------------------------------------------------------- combinators
def create_mask(mask_mod: MaskMod, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, device=None) -> Tensor:
    """Dense bool ``(B or 1, H or 1, Q_LEN, KV_LEN)``, True = attend (FlexAttention's ``create_mask``)."""
    b = torch.arange(B or 1, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H or 1, device=device).view(1, -1, 1, 1)
    q = torch.arange(Q_LEN, device=device).view(1, 1, -1, 1)
    k = torch.arange(KV_LEN, device=device).view(1, 1, 1, -1)
    return mask_mod(b, h, q, k).expand(B or 1, H or 1, Q_LEN, KV_LEN)


def and_masks(*mods: MaskMod) -> MaskMod:
    """Entry attended iff every mod attends it."""

    def mod(b, h, q, k):
        out = mods[0](b, h, q, k)
        for m in mods[1:]:
            out = out & m(b, h, q, k)
        return out

    return mod


def or_masks(*mods: MaskMod) -> MaskMod:
    """Entry attended iff any mod attends it."""

    def mod(b, h, q, k):
        out = mods[0](b, h, q, k)
        for m in mods[1:]:
            out = out | m(b, h, q, k)
        return out

    return mod


# --------------------------------------------------------- token-level mods
def causal_mask_mod(b, h, q, k):
    """``j <= i``."""
    return k <= q


def all_mask_mod(causal: bool = False) -> MaskMod:
    """Every key (every earlier-or-equal key when causal)."""
    if causal:
        return causal_mask_mod
    return lambda b, h, q, k: torch.ones_like(q - k, dtype=torch.bool)


def sliding_window_mask_mod(left: int, right: int = 0, causal: bool = False) -> MaskMod:
    """Token-exact window ``i - left <= j <= i + right`` (the :class:`LocalWindow` rule)."""
    return LocalWindow.sliding(left, right, causal).mask_mod()


def local_mask_mod(local_attn_ctx: int, causal: bool = True) -> MaskMod:
    """OpenAI's ``local`` mode: the last ``local_attn_ctx`` positions (``|i-j| < ctx`` if not causal)."""
    ctx = _pos_int(local_attn_ctx, "local_attn_ctx")
    return sliding_window_mask_mod(ctx - 1, 0 if causal else ctx - 1, causal)


def strided_mask_mod(stride: int, causal: bool = True) -> MaskMod:
    """``(i - j) mod stride == 0`` (and ``j <= i`` when causal)."""
    l = _pos_int(stride, "stride")

    def mod(b, h, q, k):
        keep = torch.remainder(q - k, l) == 0
        return keep & (k <= q) if causal else keep

    return mod


def fixed_mask_mod(stride: int, summary: int, num_verts: int = 1, causal: bool = True) -> MaskMod:
    """Sparse Transformer's ``fixed`` pattern, heads rotating their summary columns.

    Query ``i`` sees its own stride-``l`` chunk (``j // l == i // l``) and the
    summary columns ``j mod l in [l - c(g+1), l - c g)`` with ``g = h mod
    num_verts`` (OpenAI's ``num_verts`` / ``vertsize``; ``num_verts=1`` is the
    paper's last ``c`` columns of every chunk).
    """
    l, c, nv = _pos_int(stride, "stride"), _pos_int(summary, "summary"), _pos_int(num_verts, "num_verts")
    if c * nv > l:
        raise ValueError(f"summary * num_verts ({c} * {nv}) must not exceed the stride ({l})")

    def mod(b, h, q, k):
        g = torch.remainder(h, nv)
        col = torch.remainder(k, l)
        keep = (torch.div(k, l, rounding_mode="floor") == torch.div(q, l, rounding_mode="floor")) | (
            (col >= l - c * (g + 1)) & (col < l - c * g)
        )
        return keep & (k <= q) if causal else keep

    return mod


def dilated_mask_mod(segment_length: int, dilation: int, causal: bool = False) -> MaskMod:
    """LongNet: same segment of length ``w``, and both positions at offset ``h mod r`` (mod ``r``) inside it."""
    w, r = _pos_int(segment_length, "segment_length"), _pos_int(dilation, "dilation")

    def mod(b, h, q, k):
        off = torch.remainder(h, r)
        keep = torch.div(q, w, rounding_mode="floor") == torch.div(k, w, rounding_mode="floor")
        keep = (
            keep
            & (torch.remainder(torch.remainder(q, w), r) == off)
            & (torch.remainder(torch.remainder(k, w), r) == off)
        )
        return keep & (k <= q) if causal else keep

    return mod


def global_mask_mod(global_positions: Union[int, Sequence[int], Tensor], causal: bool = False) -> MaskMod:
    """Global tokens: ``i`` or ``j`` is global (an int ``n`` means positions ``0..n-1``)."""
    if isinstance(global_positions, int) and not isinstance(global_positions, bool):
        pos = torch.arange(_pos_int(global_positions, "global_positions", zero_ok=True))
    else:
        pos = torch.as_tensor(global_positions, dtype=torch.long).flatten()

    def is_global(x):
        return (x.unsqueeze(-1) == pos.to(x.device)).any(-1)

    def mod(b, h, q, k):
        keep = is_global(q) | is_global(k)
        return keep & (k <= q) if causal else keep

    return mod


def layout_mask_mod(layout: Tensor, block_size: int) -> MaskMod:
    """The token mask of a block layout ``(H or 1, nq, nk)``: attend iff the entry's block is kept."""
    bs = _pos_int(block_size, "block_size")
    layout = as_layout(layout)

    def mod(b, h, q, k):
        lay = layout.to(q.device)
        hh = h if lay.shape[0] > 1 else torch.zeros_like(h)
        return lay[hh, torch.div(q, bs, rounding_mode="floor"), torch.div(k, bs, rounding_mode="floor")]

    return mod


# --------------------------------------------------------------- block view
def as_layout(layout: Tensor) -> Tensor:
    """Validate a user block layout (2-D or 3-D, bool or 0/1 integers); returns it bool ``(H or 1, nq, nk)``."""
    if not isinstance(layout, Tensor):
        raise TypeError(f"layout must be a Tensor, got {type(layout).__name__}")
    if layout.dim() == 2:
        layout = layout.unsqueeze(0)
    if layout.dim() != 3:
        raise ValueError(f"layout must be 2-D or 3-D (heads, q_blocks, k_blocks), got shape {tuple(layout.shape)}")
    if layout.dtype != torch.bool:
        if layout.is_floating_point() or layout.is_complex() or not torch.all((layout == 0) | (layout == 1)):
            raise ValueError(f"layout must be bool or hold only 0/1 integers, got {layout.dtype}")
        layout = layout.bool()
    return layout


def layout_from_mask_mod(
    mask_mod: MaskMod,
    heads: int,
    q_len: int,
    kv_len: Optional[int] = None,
    block_size: int = 64,
    device=None,
    rows_per_chunk: int = 16,
    q_block_start: int = 0,
) -> Tensor:
    """Coarsen a mask_mod to blocks: ``(H, ceil(T/bs), ceil(S/bs))``, True where a block has any attended entry.

    Evaluated ``rows_per_chunk`` query blocks at a time (memory ``O(rows * bs * S)``).  With
    ``q_block_start`` only the query-block rows from there on are built (decoding needs the last ones).
    """
    bs = _pos_int(block_size, "block_size")
    kv_len = q_len if kv_len is None else kv_len
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    h = torch.arange(heads, device=device).view(-1, 1, 1)
    k = torch.arange(nk * bs, device=device).view(1, 1, -1)
    rows = []
    for start in range(q_block_start, nq, rows_per_chunk):
        stop = min(nq, start + rows_per_chunk)
        q = torch.arange(start * bs, stop * bs, device=device).view(1, -1, 1)
        m = mask_mod(torch.zeros((), dtype=torch.long, device=device), h, q, k).expand(heads, q.shape[1], k.shape[2])
        m = m & (q < q_len) & (k < kv_len)
        rows.append(m.reshape(heads, stop - start, bs, nk, bs).any(dim=4).any(dim=2))
    return torch.cat(rows, dim=1)


def expand_layout(layout: Tensor, block_size: int, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> Tensor:
    """Block layout -> token mask ``(H, T, S)`` (True = attend), cropped to ``q_len`` / ``kv_len``."""
    layout = as_layout(layout)
    dense = layout.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return dense[:, : q_len or dense.shape[1], : kv_len or dense.shape[2]]


def random_layout(
    heads: int,
    n_blocks: int,
    num_random_blocks: int,
    seed: int = 0,
    causal: bool = False,
    n_k_blocks: Optional[int] = None,
    first_row: int = 0,
) -> Tensor:
    """``num_random_blocks`` distinct random key blocks per (head, query block), seeded per row.

    With ``causal`` they are drawn among the blocks ``<=`` the query block (all of them when there
    are fewer), and row ``r`` depends only on ``(seed, r)``: the layout of a prefix is the prefix of
    the layout, so decoding step by step sees the same blocks as a full pass.  ``first_row``: only
    the rows from there on, ``(H, n_blocks - first_row, nk)`` (a decoding step needs its own row).
    """
    r = _pos_int(num_random_blocks, "num_random_blocks", zero_ok=True)
    nk = n_blocks if n_k_blocks is None else n_k_blocks
    layout = torch.zeros(heads, n_blocks - first_row, nk, dtype=torch.bool)
    if r == 0:
        return layout
    for row in range(first_row, n_blocks):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + row)
        width = min(row + 1, nk) if causal else nk
        pick = torch.rand(heads, width, generator=g).topk(min(r, width), dim=-1).indices
        layout[:, row - first_row].scatter_(-1, pick, True)
    return layout


def bigbird_layout(
    heads: int,
    n_blocks: int,
    num_window_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 1,
    seed: int = 0,
    causal: bool = False,
    first_row: int = 0,
) -> Tensor:
    """BigBird: a band of ``num_window_blocks`` blocks (centred; trailing if causal), the first
    ``num_global_blocks`` blocks as global rows and columns, and seeded random blocks (``first_row``: only
    the rows from there on)."""
    w = _pos_int(num_window_blocks, "num_window_blocks")
    ng = _pos_int(num_global_blocks, "num_global_blocks", zero_ok=True)
    qb = torch.arange(first_row, n_blocks).view(-1, 1)
    kb = torch.arange(n_blocks).view(1, -1)
    if causal:
        band = (kb <= qb) & (kb > qb - w)
    else:
        band = (kb - qb).abs() <= w // 2
    glob = (qb < ng) | (kb < ng)
    rand = random_layout(heads, n_blocks, num_random_blocks, seed, causal, first_row=first_row)
    layout = (band | glob)[None].expand(heads, -1, -1) | rand
    if causal:
        layout = layout & (kb <= qb)
    return layout.contiguous()


def fixed_layout(
    heads: int,
    n_blocks: int,
    local_attn_ctx: int,
    block_size: int,
    num_verts: int = 1,
    vertsize: int = 1,
    first_row: int = 0,
) -> Tensor:
    """OpenAI's block layout of the ``fixed`` mode (``local_attn_ctx`` tokens = ``local_attn_ctx/bs`` blocks);
    ``first_row``: only the rows from there on."""
    _check_fixed(heads, local_attn_ctx, block_size, num_verts, vertsize)
    mod = fixed_mask_mod(local_attn_ctx // block_size, vertsize, num_verts, causal=True)
    h = torch.arange(heads).view(-1, 1, 1)
    q = torch.arange(first_row, n_blocks).view(1, -1, 1)
    k = torch.arange(n_blocks).view(1, 1, -1)
    return mod(torch.zeros((), dtype=torch.long), h, q, k).expand(heads, n_blocks - first_row, n_blocks)


def _check_fixed(heads, local_attn_ctx, block_size, num_verts, vertsize):
    _pos_int(local_attn_ctx, "local_attn_ctx")
    _pos_int(num_verts, "num_verts")
    _pos_int(vertsize, "vertsize")
    if heads % num_verts != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of num_verts ({num_verts})")
    if local_attn_ctx % block_size != 0:
        raise ValueError(f"local_attn_ctx ({local_attn_ctx}) must be a multiple of block_size ({block_size})")
    stride = local_attn_ctx // block_size
    if stride % vertsize != 0 or vertsize * num_verts > stride:
        raise ValueError(
            f"vertsize ({vertsize}) must divide local_attn_ctx/block_size ({stride}) and num_verts * vertsize "
            f"({num_verts * vertsize}) must not exceed it"
        )


# ------------------------------------------------------------ by name
PATTERNS = ("all", "local", "sliding", "strided", "fixed", "dilated", "global", "random", "bigbird")
BLOCK_LEVEL_PATTERNS = ("random", "bigbird")  # whole blocks, no token rule


def make_mask_mod(
    pattern: str,
    *,
    heads: int = 1,
    block_size: int = 64,
    causal: bool = False,
    local_attn_ctx: int = 64,
    window: int = 64,
    num_verts: int = 1,
    vertsize: int = 1,
    dilation: int = 2,
    num_global: int = 1,
    n: Optional[int] = None,
    **block_kw,
) -> MaskMod:
    """The token-level mask_mod of a named pattern (block-level patterns need ``n``, the sequence length).

    ``local`` / ``strided`` / ``fixed`` follow OpenAI (``local_attn_ctx`` is the band / stride);
    ``sliding`` is ``window`` keys back (and forward when not causal); ``dilated`` uses segments of
    ``window`` with ``dilation``; ``global`` makes the first ``num_global`` positions global.
    """
    if pattern == "all":
        return all_mask_mod(causal)
    if pattern == "local":
        return local_mask_mod(local_attn_ctx, causal)
    if pattern == "sliding":
        return sliding_window_mask_mod(window, 0 if causal else window, causal)
    if pattern == "strided":
        return strided_mask_mod(local_attn_ctx, causal)
    if pattern == "fixed":
        _check_fixed(heads, local_attn_ctx, block_size, num_verts, vertsize)
        return fixed_mask_mod(local_attn_ctx, vertsize * block_size, num_verts, causal)
    if pattern == "dilated":
        return dilated_mask_mod(window, dilation, causal)
    if pattern == "global":
        return global_mask_mod(num_global, causal)
    if pattern in BLOCK_LEVEL_PATTERNS:
        if n is None:
            raise ValueError(f"pattern {pattern!r} is block-level: pass n (the sequence length)")
        lay = make_layout(pattern, n, block_size, heads, causal=causal, **block_kw)
        mod = layout_mask_mod(lay, block_size)
        return and_masks(mod, causal_mask_mod) if causal else mod
    raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")


def make_layout(
    pattern: str,
    n: int,
    block_size: int,
    heads: int,
    *,
    causal: bool = False,
    seed: int = 0,
    num_window_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 1,
    first_row: int = 0,
    **kw,
) -> Tensor:
    """Block layout ``(H, ceil(n/bs), ceil(n/bs))`` of a named pattern (see :data:`PATTERNS`); ``first_row``:
    only the query-block rows from there on (what a decoding step needs, without building the others)."""
    _pos_int(n, "n")
    bs = _pos_int(block_size, "block_size")
    nb = -(-n // bs)
    if pattern == "random":
        lay = random_layout(heads, nb, num_random_blocks, seed, causal, first_row=first_row)
        eye = torch.arange(first_row, nb).view(-1, 1) == torch.arange(nb)  # the diagonal keeps every row non-empty
        return lay | eye[None]
    if pattern == "bigbird":
        return bigbird_layout(
            heads, nb, num_window_blocks, num_global_blocks, num_random_blocks, seed, causal, first_row=first_row
        )
    mod = make_mask_mod(pattern, heads=heads, block_size=bs, causal=causal, **kw)
    return layout_from_mask_mod(mod, heads, n, n, bs)[:, first_row:]


def format_layout(layout: Tensor, on: str = "#", off: str = ".") -> str:
    """Printable form: one character per block, heads separated by a header line."""
    layout = as_layout(layout)
    parts = []
    for h in range(layout.shape[0]):
        rows = ["".join(on if x else off for x in row.tolist()) for row in layout[h]]
        parts.append(f"head {h} ({int(layout[h].sum())}/{layout[h].numel()} blocks):\n" + "\n".join(rows))
    return "\n".join(parts)
