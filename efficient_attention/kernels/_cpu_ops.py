"""Fake (meta) implementations of the C++ ops ``torch.ops.efficient_attention.*`` (sparse, causal linear and
landmark attention).

The schemas and CPU kernels are registered by the extension (``csrc/register.cpp``);
this module is imported by the loader once the extension is loaded.  Their autograd is the
``autograd.Function`` of each op in ``ops.py`` (shared with the Triton kernels).
"""

from __future__ import annotations

import torch

_NS = "efficient_attention"


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``x``'s shape and dtype: the C++ kernels compute on contiguous copies of their inputs
    and return contiguous gradients whatever the inputs' layouts (a fake that kept an input's strides, e.g. the
    heads of a time-first projection, made a compiled backward's ``view`` of the real gradient fail)."""
    return x.new_empty(x.shape)


def _fake_fwd(q, k, v):
    out = q.new_empty((*q.shape[:3], v.shape[-1]))
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake(f"{_NS}::sliding_window_fwd")
def _sw_fwd_fake(q, k, v, key_padding_mask, group, left, right, causal, q_offset, scale):
    return _fake_fwd(q, k, v)


@torch.library.register_fake(f"{_NS}::block_sparse_fwd")
def _bs_fwd_fake(q, k, v, row_idx, row_cnt, row_tile, tiles, block_size, causal, key_padding_mask, scale):
    return _fake_fwd(q, k, v)


@torch.library.register_fake(f"{_NS}::sliding_window_bwd")
def _sw_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, group, left, right, causal, q_offset, scale):
    return _dense_like(q), _dense_like(k), _dense_like(v)


@torch.library.register_fake(f"{_NS}::block_sparse_bwd")
def _bs_bwd_fake(
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
    tiles,
    block_size,
    causal,
    key_padding_mask,
    scale,
):
    return _dense_like(q), _dense_like(k), _dense_like(v)


@torch.library.register_fake(f"{_NS}::linear_causal_fwd")
def _linear_fwd_fake(q, k, v, log_decay, h0, z0, normalize, chunk, cos_sin=None, act=0):
    bsz, heads, length, m = q.shape
    m = 2 * m if cos_sin is not None else m  # cosFormer's features made in the kernel
    d = v.shape[-1]
    n = -(-length // chunk)
    return (
        q.new_empty(bsz, heads, length, d),
        q.new_empty((bsz, heads, length) if normalize else (0,)),
        q.new_empty(bsz, heads, n, d + int(normalize), m),
        q.new_empty(bsz, heads, m, d),
        q.new_empty((bsz, heads, m) if normalize else (0,)),
    )


@torch.library.register_fake(f"{_NS}::linear_causal_bwd")
def _linear_bwd_fake(
    grad_num, grad_den, grad_h, grad_z, q, k, v, log_decay, states, normalize, chunk, cos_sin=None, act=0
):
    bsz, heads, _, m = q.shape
    m = 2 * m if cos_sin is not None else m
    d = v.shape[-1]
    return (
        _dense_like(q),
        _dense_like(k),
        _dense_like(v),
        q.new_empty(bsz, heads, m, d),
        q.new_empty((bsz, heads, m) if normalize else (0,)),
    )


@torch.library.register_fake(f"{_NS}::landmark_fwd")
def _landmark_fwd_fake(q, k, v, key_padding_mask, block_size, scale):
    return _fake_fwd(q, k, v)


@torch.library.register_fake(f"{_NS}::landmark_bwd")
def _landmark_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, block_size, scale):
    return _dense_like(q), _dense_like(k), _dense_like(v)
