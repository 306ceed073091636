"""Launching the Triton GPU kernels of the sparse ops, and their ``torch.library`` custom ops.

``sliding_window_fwd`` / ``block_sparse_fwd`` (registered as ``torch.ops.efficient_attention.triton_sliding_window``
and ``triton_block_sparse``, with fake impls) take ``(B, H, N, d)`` CUDA tensors (k, v already with q's head
count) and return ``(out, lse)``; the ``*_bwd`` functions return ``(dq, dk, dv)``.  The sliding-window ops take an
optional ``q_pos (B, H, T)`` int32, each query row's position (nondecreasing along ``T``; ``q_offset`` unused
then).  Autograd is the op's one ``autograd.Function`` in ``ops.py``.  See ``_triton_kernels.py`` for the
algorithm.  Importing this module requires Triton.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _triton_kernels as tk
from ._triton_common import launch

__all__ = [
    "window_config",
    "block_config",
    "sliding_window_fwd",
    "sliding_window_bwd",
    "block_sparse_fwd",
    "block_sparse_bwd",
]

_UNBOUNDED = 1 << 30


# Tiles are loaded with TMA descriptors (the Hopper tensor-memory accelerator, sm_90+, where the
# tensors are 16-byte aligned; masked pointer loads otherwise).  Their descriptors cost host time, so
# bands under TMA_MIN_SPAN keys keep pointer loads (the measurements: benchmarks/README.md,
# "Kernel configuration").  Block-sparse calls of fewer than TMA_MIN_ROWS rows (B * H * N) keep them too: their
# GPU work is smaller than the host's work for the step (CAB's setting, B*H = 32, is host-bound below 8k), so
# the six descriptors would only add host time.
TMA_MIN_SPAN = 512
TMA_MIN_ROWS = 1 << 18


# Half-precision tiles of bands wider than TMA_MIN_SPAN keys, per head dim (up to 64, up to 128), by the widest
# span each row serves: (span limit, fwd, dq, dkdv), a kernel's tiles as (BLOCK_M query rows, BLOCK_N keys,
# num_warps, num_stages[, maxnreg]).  The H200 sweep (benchmarks/window_sweep_gpu.py, N = 64k, causal W = 1024,
# 2048, 4096; benchmarks/results/h200/window_sweep_1812.log) kept only changes that won at every W it covers:
# at d = 64 a register cap on the backward (dq 148 -> 128 registers a thread: 1.5-6% off the backward; dk/dv
# 200 -> 168, 3 programs per SM instead of 2: 2-3.5%); at d = 128 above 1024 keys 128x64 forward tiles with 8
# warps (2%) and 64x64 dk/dv tiles (0.3-4%; the 64x128 ones spill).  Up to 1024 keys at d = 128, and every
# forward at d = 64, the H100's tiles (benchmarks/kernels_gpu_sweep.py, benchmarks/README.md) still won.
_WIDE_BANDS = {
    64: ((None, (64, 64, 4, 3), (64, 64, 4, 3, 128), (64, 64, 4, 3, 168)),),
    128: (
        (1024, (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 2)),
        (None, (128, 64, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)),
    ),
}


def _tiles(t: tuple, tma: bool) -> dict:
    bm, bn, warps, stages, *maxnreg = t
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, LUT_BLOCK=max(bm, bn, 64), TMA=tma)
    return dict(cfg, maxnreg=maxnreg[0]) if maxnreg else cfg


@functools.lru_cache(maxsize=None)
def window_config(span: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the sliding-window kernels (fwd, dq, dkdv) for a band of ``span`` keys.

    Returns ``{"fwd", "dq", "dkdv": {BLOCK_M, BLOCK_N, num_warps, num_stages, LUT_BLOCK, TMA[, maxnreg]}}``,
    cached (callers must not mutate the dicts).  Forward 64x64 tiles; backward thin tiles for short bands, 64x64,
    then the ``_WIDE_BANDS`` tiles for wide half-precision bands (how they were chosen: ``benchmarks/README.md``,
    "Kernel configuration").
    """
    wide = dtype == torch.float32 and head_dim > 64  # fp32 tiles of d = 128 need less shared memory
    tma = span >= TMA_MIN_SPAN
    if dtype != torch.float32 and span > TMA_MIN_SPAN and head_dim <= 128:
        for limit, *tiles in _WIDE_BANDS[64 if head_dim <= 64 else 128]:
            if limit is None or span <= limit:
                return dict(zip(("fwd", "dq", "dkdv"), (_tiles(t, tma) for t in tiles)))
    fwd = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1 if wide else 3, LUT_BLOCK=64, TMA=tma)
    if dtype == torch.float32 or head_dim <= 64:
        bwd = dict(
            BLOCK_M=64,
            BLOCK_N=64,
            num_warps=4 if head_dim <= 64 else 8,
            num_stages=1 if wide else 3,
            LUT_BLOCK=64,
            TMA=tma,
        )
        if dtype != torch.float32 and span <= 512:
            return dict(fwd=fwd, dq=dict(bwd, BLOCK_N=32), dkdv=dict(bwd, BLOCK_M=32))
        return dict(fwd=fwd, dq=bwd, dkdv=bwd)
    if span <= 1024:
        bwd = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, LUT_BLOCK=64, TMA=tma)
        return dict(fwd=fwd, dq=bwd, dkdv=bwd)
    return dict(
        fwd=fwd,
        dkdv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, LUT_BLOCK=128, TMA=tma),
        dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, LUT_BLOCK=128, TMA=tma),
    )


@functools.lru_cache(maxsize=None)
def block_config(block_size: int, head_dim: int, dtype: torch.dtype, tma: bool = True) -> dict:
    """Tiles of the block-sparse kernels: 64x64 tiles (a layout block of 128 is visited as 2x2 of them).

    TMA loads where ``tma`` (see ``TMA_MIN_ROWS``; how they were chosen: ``benchmarks/README.md``,
    "Kernel configuration").
    """
    wide = dtype == torch.float32 and head_dim > 64  # fp32 tiles of d = 128 need less shared memory
    t = min(block_size, 64)
    cfg = dict(
        BLOCK_M=t, BLOCK_N=t, num_warps=8 if wide else 4, num_stages=1 if wide else 3, LUT_BLOCK=block_size, TMA=tma
    )
    return dict(fwd=cfg, dq=cfg, dkdv=cfg)


_dummies: dict = {}


def _dummy(q: Tensor, dtype: torch.dtype) -> Tensor:
    """A 1-element placeholder for an unused pointer argument (cached: no allocation per call)."""
    key = (q.device, dtype)
    t = _dummies.get(key)
    if t is None:
        t = _dummies[key] = torch.zeros(1, dtype=dtype, device=q.device)
    return t


def _kpm(kpm: Optional[Tensor], q: Tensor) -> Tuple[Tensor, bool]:
    if kpm is None:
        return _dummy(q, torch.uint8), False
    return kpm.view(torch.uint8).contiguous(), True


def _kernel_view(t: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
    """``(t, (s_bh, s_row))``: ``t (B, H, N, d)`` as the kernels read it, row ``n`` of head ``b*H + h`` at element
    ``(b*H + h) * s_bh + n * s_row``.  Two dense layouts are read in place: contiguous ``(B, H, N, d)`` and
    time-first ``(N, B, H, d)`` memory (what ``split_heads`` of a projection gives, and what the outputs then
    keep: no copy on the way in or out); any other is copied contiguous."""
    B, H, N, D = t.shape
    sb, sh, sn, sd = t.stride()
    bh = B * H
    s_bh = sh if H > 1 else sb
    if (sd == 1 or D == 1) and (B == 1 or H == 1 or sb == H * sh):
        if (bh == 1 or s_bh == N * D) and (N == 1 or sn == D):
            return t, (N * D, D)
        if (bh == 1 or s_bh == D) and (N == 1 or sn == bh * D) and (N + 128) * bh * D < 2**31:  # int32 offsets
            return t, (D, bh * D)
    return t.contiguous(), (N * D, D)


def _like(anchor: Tensor, x: Tensor) -> Tensor:
    """``x`` copied into ``anchor``'s (dense) layout, for tensors that must share one set of kernel strides."""
    return torch.empty_like(anchor).copy_(x)


def _tma_desc(t: Tensor, strides: Tuple[int, int], rows: int):
    """A TMA descriptor of ``t (B, H, N, d)`` seen as ``(B*H, N, d)`` with its kernel ``strides``, loading
    ``rows x d`` tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, N, D = t.shape
    return TensorDescriptor(t, [B * H, N, D], [strides[0], strides[1], 1], [1, rows, D])


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(*ts: Tensor, strides: Tuple[int, ...] = ()) -> bool:
    """The Hopper tensor-memory accelerator needs sm_90+, 16-byte aligned bases and 16-byte aligned strides."""
    size = ts[0].element_size()
    return (
        all(t.device.type == "cuda" and t.data_ptr() % 16 == 0 for t in ts)
        and all(s * size % 16 == 0 for s in strides)
        and _has_tma(ts[0].device)
    )


def _with_tma(cfg: dict, a: Tensor, b: Tensor, strides: Tuple[int, int], block: str):
    """``cfg`` with TMA kept only where usable, and the descriptors of ``a``, ``b`` (tiles of ``cfg[block]``
    rows; both with the kernel ``strides``) to pass for them, or the tensors themselves for pointer loads.
    Sequences shorter than one tile (decoding steps, short prompts) keep pointer loads: nothing to gain,
    and no tile box larger than its tensor is ever encoded."""
    if not cfg.get("TMA", False):
        return cfg, (a, b)  # (the configs are cached and never mutated: no copy)
    c = dict(cfg)
    c["TMA"] = min(a.shape[2], b.shape[2]) >= c[block] and _tma_ok(a, b, strides=strides)
    if not c["TMA"]:
        return c, (a, b)
    return c, (_tma_desc(a, strides, c[block]), _tma_desc(b, strides, c[block]))


def _flags(q: Tensor) -> dict:
    return dict(IEEE=q.dtype == torch.float32, HEAD_DIM=q.shape[-1])


def _qkv_views(q, k, v):
    """q, k, v in kernel layouts (``_kernel_view``) with their strides; k and v share theirs."""
    q, sq = _kernel_view(q)
    k, sk = _kernel_view(k)
    v, sv = _kernel_view(v)
    if sv != sk:
        v = _like(k, v)
    return q, k, v, sq, sk


def _qpos(qpos: Optional[Tensor], q: Tensor) -> Tuple[Tensor, bool]:
    """Per-row query positions as the kernels read them (``(B*H, T)`` int32 rows), or a placeholder."""
    if qpos is None:
        return _dummy(q, torch.int32), False
    return qpos.to(torch.int32).contiguous(), True


def _forward(q, k, v, kpm, rule, lut, cfg, qpos=None):
    q, k, v, sq, sk = _qkv_views(q, k, v)
    B, H, T, D = q.shape
    S = k.shape[2]
    out = torch.empty_like(q)  # q's layout (a dense tensor's strides are kept)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    kpm_t, has_kpm = _kpm(kpm, q)
    qpos_t, has_qpos = _qpos(qpos, q)
    scale, q_offset, group, left, right, causal, window = rule
    idx, cnt, tile, tiles, lut_heads, rows, cols = lut
    c, (kd, vd) = _with_tma(cfg, k, v, sk, "BLOCK_N")
    launch(
        tk._fwd_kernel,
        _grid(lut, T, c["BLOCK_M"], B * H),
        (q, k, v, kd, vd, kpm_t, qpos_t, idx, cnt, tile, tiles, out, lse),
        (scale * tk.LOG2E, H, T, S, *sq, *sk, q_offset, group, left, right, lut_heads, rows, cols),
        dict(
            CAUSAL=causal,
            WINDOW=window,
            USE_LUT=idx is not cnt,
            HAS_KPM=has_kpm,
            HAS_TILES=tile is not idx,
            HAS_QPOS=has_qpos,
            **_flags(q),
            **c,
        ),
    )
    return out, lse


def _backward(do, dlse, q, k, v, out, lse, kpm, rule, lut, lut_t, cfgs, qpos=None):
    q, k, v, sq, sk = _qkv_views(q, k, v)
    if do.stride() != q.stride():  # (the gradient of an output made in q's layout mostly comes back in it)
        do = _like(q, do)
    if out.stride() != q.stride():
        out = _like(q, out)
    B, H, T, D = q.shape
    S = k.shape[2]
    lse = lse.contiguous()
    has_dlse = dlse is not None
    dlse = dlse.contiguous() if has_dlse else lse  # (unused pointer without a lse gradient)
    delta = torch.empty_like(lse)  # written by the dq kernel, read by the dk/dv kernel
    kpm_t, has_kpm = _kpm(kpm, q)
    qpos_t, has_qpos = _qpos(qpos, q)
    scale, q_offset, group, left, right, causal, window = rule
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags = dict(CAUSAL=causal, WINDOW=window, HAS_KPM=has_kpm, HAS_QPOS=has_qpos, **_flags(q))
    idx, cnt, tile, tiles, lut_heads, rows, cols = lut
    cfg, (kd, vd) = _with_tma(cfgs["dq"], k, v, sk, "BLOCK_N")
    launch(
        tk._bwd_dq_kernel,
        _grid(lut, T, cfg["BLOCK_M"], B * H),
        (q, k, v, kd, vd, kpm_t, qpos_t, idx, cnt, tile, tiles, do, out, dlse, lse, delta, dq),
        (scale * tk.LOG2E, scale, H, T, S, *sq, *sk, q_offset, group, left, right, lut_heads, rows, cols),
        dict(USE_LUT=idx is not cnt, HAS_DLSE=has_dlse, HAS_TILES=tile is not idx, **flags, **cfg),
    )
    idx, cnt, tile, tiles, lut_heads, rows, cols = lut_t
    cfg, (qd, dod) = _with_tma(cfgs["dkdv"], q, do, sq, "BLOCK_M")
    launch(
        tk._bwd_dkdv_kernel,
        _grid(lut_t, S, cfg["BLOCK_N"], B * H),
        (q, k, v, qd, dod, kpm_t, qpos_t, idx, cnt, tile, tiles, do, lse, delta, dk, dv),
        (scale * tk.LOG2E, scale, H, T, S, *sq, *sk, q_offset, group, left, right, lut_heads, rows, cols),
        dict(USE_LUT=idx is not cnt, HAS_TILES=tile is not idx, **flags, **cfg),
    )
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _grid(lut, n: int, block: int, bh: int) -> Tuple[int, int]:
    """``(tiles, B*H)`` for a band, ``(B*H, tiles)`` for a layout (see ``_program_tile``)."""
    return (triton_cdiv(n, block), bh) if lut[0] is lut[1] else (bh, triton_cdiv(n, block))


def _no_lut(q: Tensor):
    dummy = _dummy(q, torch.int32)
    return dummy, dummy, dummy, _dummy(q, torch.uint8), 1, 1, 1  # idx is cnt -> USE_LUT=False; tile is idx: no tiles


def _window_rule(scale, q_offset, group, left, right, causal):
    return (scale, q_offset, group, min(left, _UNBOUNDED), min(right, _UNBOUNDED), causal, True)


def _block_rule(scale, causal, T, S):
    return (scale, S - T, 1, _UNBOUNDED, _UNBOUNDED, causal, False)


def _layout_tma(q: Tensor, k: Tensor) -> bool:
    """Whether a block-sparse call is large enough for TMA descriptors (``TMA_MIN_ROWS``)."""
    return q.shape[0] * q.shape[1] * max(q.shape[2], k.shape[2]) >= TMA_MIN_ROWS


def _mask_luts(q: Tensor, row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles):
    """The kernels' lookup tuples ``(idx, cnt, tile, tiles, heads, rows, cols)`` of a block mask's tables
    (:meth:`BlockMask.tables`) and of their transpose; ``tile is idx`` marks a mask without tiles."""
    if tiles is None:
        tiles, row_tile, col_tile = _dummy(q, torch.uint8), row_idx, col_idx
    lut = (row_idx, row_cnt, row_tile, tiles, *row_idx.shape)
    lut_t = (col_idx, col_cnt, col_tile, tiles, *col_idx.shape)
    return lut, lut_t


# -- sliding window -------------------------------------------------------------------------------
# The plain launch functions below are what eager mode calls (from ``ops._SlidingWindowFn``); the custom
# ops registered from them (with fake impls) are what torch.compile sees.  Autograd: ``ops.py``.
def sliding_window_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    group: int,
    left: int,
    right: int,
    causal: bool,
    q_offset: int,
    scale: float,
    q_pos: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    cfg = window_config(left + right + group, q.shape[-1], q.dtype)["fwd"]
    rule = _window_rule(scale, q_offset, group, left, right, causal)
    return _forward(q, k, v, key_padding_mask, rule, _no_lut(q), cfg, q_pos)


def sliding_window_bwd(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Optional[Tensor],
    group: int,
    left: int,
    right: int,
    causal: bool,
    q_offset: int,
    scale: float,
    q_pos: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    cfg = window_config(left + right + group, q.shape[-1], q.dtype)
    rule = _window_rule(scale, q_offset, group, left, right, causal)
    lut = _no_lut(q)
    return _backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, rule, lut, lut, cfg, q_pos)


triton_sliding_window = torch.library.custom_op(
    "efficient_attention::triton_sliding_window", sliding_window_fwd, mutates_args=()
)
triton_sliding_window_bwd = torch.library.custom_op(
    "efficient_attention::triton_sliding_window_bwd", sliding_window_bwd, mutates_args=()
)


@triton_sliding_window.register_fake
def _(q, k, v, key_padding_mask, group, left, right, causal, q_offset, scale, q_pos=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@triton_sliding_window_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, group, left, right, causal, q_offset, scale, q_pos=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# -- block sparse ---------------------------------------------------------------------------------
# The block mask travels as its tables (``BlockMask.tables``): row_* for the forward and dq passes,
# col_* (the transposed layout) for the dk/dv pass, tiles for the partial blocks (None: no tiles).
def block_sparse_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row_idx: Tensor,
    row_cnt: Tensor,
    row_tile: Optional[Tensor],
    col_idx: Tensor,
    col_cnt: Tensor,
    col_tile: Optional[Tensor],
    tiles: Optional[Tensor],
    block_size: int,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    scale: float,
) -> Tuple[Tensor, Tensor]:
    cfg = block_config(block_size, q.shape[-1], q.dtype, _layout_tma(q, k))["fwd"]
    lut, _ = _mask_luts(q, row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles)
    return _forward(q, k, v, key_padding_mask, _block_rule(scale, causal, q.shape[2], k.shape[2]), lut, cfg)


def block_sparse_bwd(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    row_idx: Tensor,
    row_cnt: Tensor,
    row_tile: Optional[Tensor],
    col_idx: Tensor,
    col_cnt: Tensor,
    col_tile: Optional[Tensor],
    tiles: Optional[Tensor],
    block_size: int,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    cfg = block_config(block_size, q.shape[-1], q.dtype, _layout_tma(q, k))
    lut, lut_t = _mask_luts(q, row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles)
    rule = _block_rule(scale, causal, q.shape[2], k.shape[2])
    return _backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, rule, lut, lut_t, cfg)


triton_block_sparse = torch.library.custom_op(
    "efficient_attention::triton_block_sparse", block_sparse_fwd, mutates_args=()
)
triton_block_sparse_bwd = torch.library.custom_op(
    "efficient_attention::triton_block_sparse_bwd", block_sparse_bwd, mutates_args=()
)


@triton_block_sparse.register_fake
def _(
    q, k, v, row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles, block_size, causal, key_padding_mask, scale
):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@triton_block_sparse_bwd.register_fake
def _(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    row_idx,
    row_cnt,
    row_tile,
    col_idx,
    col_cnt,
    col_tile,
    tiles,
    block_size,
    causal,
    key_padding_mask,
    scale,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
