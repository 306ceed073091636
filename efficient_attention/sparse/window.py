"""Attention over a :class:`~efficient_attention.local_window.LocalWindow` on per-head tensors.

The window rule itself is core (:mod:`efficient_attention.local_window`, which
the kernels import); these helpers compute with it on the kernels'
``sliding_window_attention`` and add what the kernels leave to the caller: the
``exclude_self`` fallback and keys that start at an absolute position (a
decoding cache).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import sliding_window_attention
from ..local_window import LocalWindow

__all__ = ["attend_self_where_empty", "window_attention", "window_attention_at"]


def attend_self_where_empty(
    out: Tensor, lse: Tensor, v: Tensor, q_offset: int = 0, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """The ``shared_qk`` fallback: a query that sees no key but itself attends to itself.

    ``out`` / ``lse`` come from a window with ``exclude_self=True`` (``lse`` is
    ``-inf`` on empty rows); ``v`` is ``(B, H|Hkv, S, d)`` with the query ``t``
    at key position ``q_offset + t``.  A padded own key stays unattended (0).
    """
    heads, tgt_len = out.shape[1], out.shape[2]
    idx = torch.arange(tgt_len, device=out.device) + q_offset
    v_self = v[:, :, idx].repeat_interleave(heads // v.shape[1], dim=1)
    empty = torch.isneginf(lse)[..., None]
    if key_padding_mask is not None:
        empty = empty & ~key_padding_mask[:, idx][:, None, :, None]
    return torch.where(empty, v_self.to(out.dtype), out)


def window_attention(
    window: LocalWindow,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_offset: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``sliding_window_attention`` plus the ``exclude_self`` fallback; returns ``out (B, H, T, d)``.

    Keys are at positions ``0 .. S - 1``, queries at ``q_offset ..``.
    """
    out, lse = sliding_window_attention(
        q, k, v, window, q_offset=q_offset, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p
    )
    if window.exclude_self:
        out = attend_self_where_empty(out, lse, v, q_offset, key_padding_mask)
    return out


def window_attention_at(
    window: LocalWindow,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    first_pos: int,
    *,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """:func:`window_attention` for keys that start at absolute position ``first_pos`` (a decoding cache).

    ``k`` / ``v`` ``(B, H, S, d)`` sit at ``first_pos .. first_pos + S - 1`` and
    the ``T`` queries are the last ``T`` of them.  The keys are front-padded
    with ``first_pos mod group`` masked dummies so that the blocks line up with
    the absolute positions.
    """
    bsz, tgt_len, src_len = q.shape[0], q.shape[2], k.shape[2]
    lead = first_pos % window.group
    if lead:
        k = torch.nn.functional.pad(k, (0, 0, lead, 0))
        v = torch.nn.functional.pad(v, (0, 0, lead, 0))
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(bsz, src_len, dtype=torch.bool, device=q.device)
        key_padding_mask = torch.nn.functional.pad(key_padding_mask, (lead, 0), value=True)
    return window_attention(
        window,
        q,
        k,
        v,
        q_offset=lead + src_len - tgt_len,
        key_padding_mask=key_padding_mask,
        scale=scale,
        dropout_p=dropout_p,
    )
