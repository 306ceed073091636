"""The Triton GPU kernels as ``torch.library`` custom ops, with fake impls and autograd.

``torch.ops.efficient_attention.triton_sliding_window`` and ``triton_block_sparse``
take ``(B, H, N, d)`` CUDA tensors (k, v already with q's head count) and return
``(out, lse)``; see ``_triton_kernels.py`` for the algorithm.  Importing this
module requires Triton.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _triton_kernels as tk

__all__ = ["window_config", "block_config"]

_UNBOUNDED = 1 << 30


def window_config(span: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the sliding-window kernels for a band of ``span`` keys."""
    big = span > 256 and not (dtype == torch.float32 and head_dim > 64)
    return dict(
        fwd=dict(BLOCK_M=128 if big else 64, BLOCK_N=64, num_warps=8 if (big or head_dim > 64) else 4, num_stages=3),
        bwd=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2),
    )


def block_config(block_size: int, head_dim: int) -> dict:
    warps = 4 if block_size * head_dim <= 64 * 64 else 8
    stages = 2 if block_size >= 128 else 3
    cfg = dict(BLOCK_M=block_size, BLOCK_N=block_size, num_warps=warps, num_stages=stages)
    return dict(fwd=cfg, bwd=cfg)


def _lut(layout: Tensor) -> Tuple[Tensor, Tensor]:
    """Per layout row: the kept column indices first, ascending (int32), and their count."""
    cnt = layout.sum(-1, dtype=torch.int32).contiguous()
    idx = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32).contiguous()
    return idx, cnt


def _kpm(kpm: Optional[Tensor], q: Tensor) -> Tuple[Tensor, bool]:
    if kpm is None:
        return q.new_zeros(1, dtype=torch.uint8), False
    return kpm.to(torch.uint8).contiguous(), True


def _flags(q: Tensor) -> dict:
    return dict(IEEE=q.dtype == torch.float32, HEAD_DIM=q.shape[-1])


def _forward(q, k, v, kpm, rule, lut, cfg):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T, D = q.shape
    S = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    kpm_t, has_kpm = _kpm(kpm, q)
    scale, q_offset, group, left, right, causal, window = rule
    idx, cnt, lut_heads, rows, cols = lut
    c = dict(cfg)
    grid = (triton_cdiv(T, c["BLOCK_M"]), B * H)
    tk._fwd_kernel[grid](
        q, k, v, kpm_t, idx, cnt, out, lse, scale * tk.LOG2E, H, T, S, q_offset, group, left, right,
        lut_heads, rows, cols, CAUSAL=causal, WINDOW=window, USE_LUT=idx is not cnt, HAS_KPM=has_kpm, **_flags(q), **c,
    )
    return out, lse


def _backward(do, dlse, q, k, v, out, lse, kpm, rule, lut, lut_t, cfg):
    q, k, v, do, out = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), out.contiguous()
    B, H, T, D = q.shape
    S = k.shape[2]
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    kpm_t, has_kpm = _kpm(kpm, q)
    scale, q_offset, group, left, right, causal, window = rule
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags = dict(CAUSAL=causal, WINDOW=window, HAS_KPM=has_kpm, **_flags(q), **cfg)
    idx, cnt, lut_heads, rows, cols = lut_t
    tk._bwd_dkdv_kernel[(triton_cdiv(S, cfg["BLOCK_N"]), B * H)](
        q, k, v, kpm_t, idx, cnt, do, lse, delta, dk, dv, scale * tk.LOG2E, scale, H, T, S, q_offset, group, left,
        right, lut_heads, rows, cols, USE_LUT=idx is not cnt, **flags,
    )
    idx, cnt, lut_heads, rows, cols = lut
    tk._bwd_dq_kernel[(triton_cdiv(T, cfg["BLOCK_M"]), B * H)](
        q, k, v, kpm_t, idx, cnt, do, lse, delta, dq, scale * tk.LOG2E, scale, H, T, S, q_offset, group, left,
        right, lut_heads, rows, cols, USE_LUT=idx is not cnt, **flags,
    )
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _no_lut(q: Tensor):
    dummy = q.new_zeros(1, dtype=torch.int32)
    return dummy, dummy, 1, 1, 1  # idx is cnt -> USE_LUT=False


def _window_rule(scale, q_offset, group, left, right, causal):
    return (scale, q_offset, group, min(left, _UNBOUNDED), min(right, _UNBOUNDED), causal, True)


def _block_rule(scale, causal, T, S):
    return (scale, S - T, 1, _UNBOUNDED, _UNBOUNDED, causal, False)


def _layout_luts(layout: Tensor):
    idx, cnt = _lut(layout)
    idx_t, cnt_t = _lut(layout.transpose(1, 2))
    lut = (idx, cnt, layout.shape[0], layout.shape[1], layout.shape[2])
    lut_t = (idx_t, cnt_t, layout.shape[0], layout.shape[2], layout.shape[1])
    return lut, lut_t


# -- sliding window -------------------------------------------------------------------------------
@torch.library.custom_op("efficient_attention::triton_sliding_window", mutates_args=())
def triton_sliding_window(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], group: int, left: int, right: int,
    causal: bool, q_offset: int, scale: float,
) -> Tuple[Tensor, Tensor]:
    cfg = window_config(left + right + group, q.shape[-1], q.dtype)["fwd"]
    rule = _window_rule(scale, q_offset, group, left, right, causal)
    return _forward(q, k, v, key_padding_mask, rule, _no_lut(q), cfg)


@triton_sliding_window.register_fake
def _(q, k, v, key_padding_mask, group, left, right, causal, q_offset, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("efficient_attention::triton_sliding_window_bwd", mutates_args=())
def triton_sliding_window_bwd(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], group: int, left: int, right: int, causal: bool, q_offset: int, scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    cfg = window_config(left + right + group, q.shape[-1], q.dtype)["bwd"]
    rule = _window_rule(scale, q_offset, group, left, right, causal)
    lut = _no_lut(q)
    return _backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, rule, lut, lut, cfg)


@triton_sliding_window_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, group, left, right, causal, q_offset, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sw_setup(ctx, inputs, output):
    q, k, v, kpm, *args = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.kpm, ctx.args = kpm, args


def _sw_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    dq, dk, dv = triton_sliding_window_bwd(grad_out, grad_lse, q, k, v, out, lse, ctx.kpm, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


triton_sliding_window.register_autograd(_sw_backward, setup_context=_sw_setup)


# -- block sparse ---------------------------------------------------------------------------------
@torch.library.custom_op("efficient_attention::triton_block_sparse", mutates_args=())
def triton_block_sparse(
    q: Tensor, k: Tensor, v: Tensor, layout: Tensor, block_size: int, causal: bool,
    key_padding_mask: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    cfg = block_config(block_size, q.shape[-1])["fwd"]
    lut, _ = _layout_luts(layout)
    return _forward(q, k, v, key_padding_mask, _block_rule(scale, causal, q.shape[2], k.shape[2]), lut, cfg)


@triton_block_sparse.register_fake
def _(q, k, v, layout, block_size, causal, key_padding_mask, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("efficient_attention::triton_block_sparse_bwd", mutates_args=())
def triton_block_sparse_bwd(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    layout: Tensor, block_size: int, causal: bool, key_padding_mask: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    cfg = block_config(block_size, q.shape[-1])["bwd"]
    lut, lut_t = _layout_luts(layout)
    rule = _block_rule(scale, causal, q.shape[2], k.shape[2])
    return _backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, rule, lut, lut_t, cfg)


@triton_block_sparse_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, layout, block_size, causal, key_padding_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _bs_setup(ctx, inputs, output):
    q, k, v, layout, block_size, causal, kpm, scale = inputs
    ctx.save_for_backward(q, k, v, *output, layout)
    ctx.kpm, ctx.args = kpm, (block_size, causal)
    ctx.scale = scale


def _bs_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, layout = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    dq, dk, dv = triton_block_sparse_bwd(grad_out, grad_lse, q, k, v, out, lse, layout, *ctx.args, ctx.kpm, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


triton_block_sparse.register_autograd(_bs_backward, setup_context=_bs_setup)
