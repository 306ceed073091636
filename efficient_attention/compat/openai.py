"""Drop-in PyTorch versions of OpenAI ``sparse_attention``'s entry points.

    from efficient_attention.compat.openai import attention_impl, blocksparse_attention_impl

``q, k, v`` are ``(batch, time, heads * dim)`` tensors; every mode is causal
(as in OpenAI's code).  Modes: ``all``, ``local`` (the last
``local_attn_ctx`` positions), ``strided`` (``(i - j) mod local_attn_ctx ==
0``) and, for the block-sparse version, ``fixed`` (``local_attn_ctx``,
``num_verts``, ``vertsize``).  ``attention_impl`` materialises the masked
scores; ``blocksparse_attention_impl`` computes only the kept blocks of the mode's
:class:`~efficient_attention.block_mask.BlockMask` on the block-sparse kernels (the
``strided`` mode runs on the transposed sequence, where it is block-local).
``recompute=True`` recomputes the attention in the backward pass
(``torch.utils.checkpoint``) instead of storing it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import layouts
from ..block_mask import BlockMask
from ..functional import dense_attention
from ..sparse.block_sparse import block_layout_attention

__all__ = [
    "attention_impl",
    "blocksparse_attention_impl",
    "get_attn_mask",
    "split_heads_batch_first",
    "merge_heads_batch_first",
    "split_heads",
    "merge_heads",
]

_MODES = ("all", "local", "strided", "fixed")


def split_heads_batch_first(x: Tensor, heads: int) -> Tensor:
    """``(B, T, heads * d)`` -> ``(B, heads, T, d)``."""
    if x.dim() != 3 or x.shape[-1] % heads:
        raise ValueError(f"expected (batch, time, heads*dim) with dim divisible by heads={heads}, got {tuple(x.shape)}")
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)


def merge_heads_batch_first(x: Tensor) -> Tensor:
    """``(B, heads, T, d)`` -> ``(B, T, heads * d)``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


# OpenAI's names (the compat API needs them); efficient_attention.functional's split_heads / merge_heads
# are the time-first ones of the fairseq-style modules.
split_heads = split_heads_batch_first
merge_heads = merge_heads_batch_first


def _mode_mod(attn_mode: str, local_attn_ctx: Optional[int]):
    if attn_mode == "all":
        return layouts.all_mask_mod(causal=True)
    if local_attn_ctx is None:
        raise ValueError(f"attn_mode={attn_mode!r} needs local_attn_ctx")
    if attn_mode == "local":
        return layouts.local_mask_mod(local_attn_ctx, causal=True)
    if attn_mode == "strided":
        return layouts.strided_mask_mod(local_attn_ctx, causal=True)
    raise ValueError(f"attn_mode must be one of {', '.join(_MODES[:3])} here, got {attn_mode!r}")


def get_attn_mask(n: int, attn_mode: str, local_attn_ctx: Optional[int] = None) -> Tensor:
    """Dense ``(n, n)`` float mask, 1 = attend (OpenAI's ``get_attn_mask``)."""
    return layouts.create_mask(_mode_mod(attn_mode, local_attn_ctx), 1, 1, n, n)[0, 0].float()


def _maybe_recompute(fn, recompute: bool, *args):
    if recompute and torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    attn_mode: str,
    local_attn_ctx: Optional[int] = None,
    recompute: bool = False,
) -> Tensor:
    """Dense masked attention with OpenAI's causal modes; ``(B, T, C)`` in and out."""
    n = k.shape[1]
    allowed = layouts.create_mask(_mode_mod(attn_mode, local_attn_ctx), 1, 1, q.shape[1], n, device=q.device)

    def run(q, k, v):
        qh, kh, vh = (split_heads_batch_first(x, heads) for x in (q, k, v))
        out, _ = dense_attention(qh, kh, vh, ~allowed)
        return merge_heads_batch_first(out)

    return _maybe_recompute(run, recompute, q, k, v)


def _strided_perm(n: int, stride: int, device) -> Tensor:
    """Order positions by residue mod ``stride`` (then by position): strided becomes block-local."""
    pos = torch.arange(n, device=device)
    return torch.argsort(torch.remainder(pos, stride) * n + pos)


def blocksparse_attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    attn_mode: str,
    local_attn_ctx: Optional[int] = None,
    blocksize: int = 32,
    num_verts: Optional[int] = None,
    vertsize: Optional[int] = None,
    recompute: bool = False,
) -> Tensor:
    """Block-sparse attention with OpenAI's modes; ``(B, T, C)`` in and out; ``T % blocksize == 0``."""
    if attn_mode not in _MODES:
        raise ValueError(f"attn_mode must be one of {', '.join(_MODES)}, got {attn_mode!r}")
    if attn_mode != "all" and local_attn_ctx is None:
        raise ValueError(f"attn_mode={attn_mode!r} needs local_attn_ctx (an int), got None")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    n = q.shape[1]
    if n % blocksize:
        raise ValueError(f"sequence length {n} must be a multiple of blocksize {blocksize}")
    if attn_mode == "fixed":
        if local_attn_ctx is None:
            raise ValueError("attn_mode='fixed' needs local_attn_ctx")
        mod = layouts.make_mask_mod(
            "fixed",
            heads=heads,
            block_size=blocksize,
            causal=True,
            local_attn_ctx=local_attn_ctx,
            num_verts=num_verts or 1,
            vertsize=vertsize or 1,
        )
    else:
        if attn_mode == "local" and local_attn_ctx is not None and local_attn_ctx % blocksize:
            raise ValueError(f"local_attn_ctx ({local_attn_ctx}) must be a multiple of blocksize ({blocksize})")
        mod = _mode_mod(attn_mode, local_attn_ctx)
    perm = None
    if attn_mode == "strided" and local_attn_ctx is not None and n % local_attn_ctx == 0:
        perm = _strided_perm(n, local_attn_ctx, q.device)
        orig = perm  # permuted index p holds original position perm[p]
        group = n // local_attn_ctx

        def mod(b, h, i, j):  # same residue class, causal by original position
            return (torch.div(i, group, rounding_mode="floor") == torch.div(j, group, rounding_mode="floor")) & (
                orig[j] <= orig[i]
            )

    with torch.no_grad():
        mask = BlockMask.from_mask_mod(mod, heads, n, n, blocksize, device=q.device)

    def run(q, k, v):
        qh, kh, vh = (split_heads_batch_first(x, heads) for x in (q, k, v))
        if perm is not None:
            qh, kh, vh = qh[:, :, perm], kh[:, :, perm], vh[:, :, perm]
        out = block_layout_attention(qh, kh, vh, mask, pad=False)
        if perm is not None:
            out = torch.empty_like(out).index_copy(2, perm, out)
        return merge_heads_batch_first(out)

    return _maybe_recompute(run, recompute, q, k, v)
