"""Shared attention math: the softmax, dense attention and head reshapes.

Every mechanism calls these instead of writing its own.  Tensors use the
``(B, H, T, d)`` layout of ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .masks import merge_masks

__all__ = [
    "softmax",
    "acc_dtype",
    "scaled_scores",
    "apply_mask",
    "dense_attention",
    "sdpa_attention",
    "split_heads",
    "merge_heads",
    "repeat_kv",
    "linear_attention_step",
    "safe_divide",
    "segment_weights",
    "LengthChunks",
    "dense_strides",
    "copy_into_layout",
    "take_inputs",
    "combine_attention",
    "logsumexp",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype long reductions run in: fp32 for half types, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scaled_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``(q · scale) kᵀ`` over the last two dims, formed in :func:`acc_dtype` and scaled before the product: fp16
    scores of large inputs would overflow to inf (then NaN after the softmax)."""
    acc = acc_dtype(q.dtype)
    return torch.matmul(q.to(acc) * scale, k.to(acc).transpose(-1, -2))


def softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax in at least fp32; rows with nothing to attend to give 0, not NaN.

    Returns the fp32 (or fp64) probabilities; callers cast with ``type_as``.
    """
    x = scores.to(acc_dtype(scores.dtype))
    empty = torch.isneginf(x.amax(dim=dim, keepdim=True))
    # empty rows are softmaxed as zeros (then zeroed), so their gradient is 0, not NaN
    probs = torch.softmax(x.masked_fill(empty, 0.0), dim=dim)
    return probs.masked_fill(empty, 0.0)


def apply_mask(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Apply a merged mask (bool True = masked, or additive) to scores."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask.to(scores.dtype)


def repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """``(B, Hkv, S, d)`` -> ``(B, H, S, d)`` for grouped-query attention."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    training: bool = False,
    before_softmax: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Exact softmax attention with the score matrix materialised.

    Args:
        q: ``(B, H, T, d)``; k: ``(B, Hkv, S, d)``; v: ``(B, Hkv, S, dv)``.
        mask: broadcastable to ``(B, H, T, S)``; bool (True = masked) or additive.
        causal: add the causal mask (see :mod:`efficient_attention.masks`).
        scale: logit scale, ``1/sqrt(d)`` by default (pass ``1.0`` if ``q`` is pre-scaled).
        before_softmax: return the masked scores instead of probabilities.

    Returns:
        ``(out (B, H, T, dv), probs (B, H, T, S))``; ``probs`` are fp32 for
        half inputs (pre-dropout), or the masked scores with ``before_softmax``.
    """
    num_heads = q.shape[1]
    k, v = repeat_kv(k, num_heads), repeat_kv(v, num_heads)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scale != 1.0:
        scores = scores * scale
    if causal:
        mask = merge_masks(q.shape[-2], k.shape[-2], attn_mask=mask, causal=True, dtype=scores.dtype, device=q.device)
    scores = apply_mask(scores, mask)
    if before_softmax:
        return v, scores
    probs = softmax(scores)
    p = probs.type_as(v)
    if dropout_p > 0.0 and training:
        p = F.dropout(p, dropout_p, training=True)
    return torch.matmul(p, v), probs


# A decoding step (one query) meets a key length that grows every step: cuDNN's SDPA backend builds a graph per
# new shape (30-50 ms of host time per step on an H200, benchmarks/decode_step_gpu.py), so one-query calls on
# CUDA leave it out; flash / memory-efficient kernels take any length.
_DECODING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    if q.is_cuda and q.shape[-2] == 1:
        with sdpa_kernel(_DECODING_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """The same as :func:`dense_attention` through ``scaled_dot_product_attention``.

    Rows with nothing to attend to give 0 (as in :func:`softmax`).
    """
    num_heads, tgt_len, src_len = q.shape[1], q.shape[-2], k.shape[-2]
    if causal and tgt_len == 1:
        causal = False  # a single query is the last position: it sees every key
    if causal and (mask is not None or tgt_len != src_len):
        mask = merge_masks(tgt_len, src_len, attn_mask=mask, causal=True, dtype=q.dtype, device=q.device)
        causal = False
    if mask is not None and mask.dtype == torch.bool:
        keep = ~mask
        empty = ~keep.any(dim=-1, keepdim=True)
        # SDPA's bool masks mean "take part"; fully masked rows are given one
        # harmless key and zeroed afterwards, so no backend yields NaN.
        keep = keep | empty
        out = _sdpa(
            q,
            k,
            v,
            attn_mask=keep,
            dropout_p=dropout_p,
            is_causal=False,
            scale=scale,
            enable_gqa=k.shape[1] != num_heads,
        )
        return out.masked_fill(empty, 0.0)
    if mask is not None:
        mask = mask.to(q.dtype)
        empty = torch.isneginf(mask.amax(dim=-1, keepdim=True))
        mask = mask.masked_fill(empty, 0.0)
        out = _sdpa(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=False,
            scale=scale,
            enable_gqa=k.shape[1] != num_heads,
        )
        return out.masked_fill(empty, 0.0)
    return _sdpa(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != num_heads)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """Time-first ``(L, B, H*d)`` -> ``(B, H, L, d)``."""
    length, bsz, dim = x.shape
    return x.view(length, bsz, num_heads, dim // num_heads).permute(1, 2, 0, 3)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, H, L, d)`` -> time-first ``(L, B, H*d)``."""
    bsz, heads, length, dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, bsz, heads * dim)


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den[..., None]`` with rows whose normaliser is 0 (nothing attended) set to 0, not NaN.

    ``num`` is ``(..., dv)`` and ``den`` is ``(...)``; gradients stay finite.
    """
    empty = den <= 0
    out = num / torch.where(empty, torch.ones_like(den), den).unsqueeze(-1)
    return out.masked_fill(empty.unsqueeze(-1), 0.0)


def linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, kv: Tensor, z: Optional[Tensor] = None, decay: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One causal decoding step of linear attention (one new query and its key): a handful of kernels.

    ``kv' = decay·kv + kᵀv``, ``z' = decay·z + k``; ``out = q kv' / (q·z')`` (``z is None``: unnormalised
    ``q kv'``).  The features are nonnegative: a normaliser of 0 (nothing attended, so ``q kv' = 0`` too) gives
    0, never NaN.  Shapes: ``q, k (B, H, 1, m)``, ``v (B, H, 1, d)``, state ``kv (B, H, m, d)``, ``z (B, H, m)``,
    ``decay`` broadcastable to ``(B, H, 1, 1)``; everything is computed in the state's dtype (under autocast
    too: no op here is one autocast runs in a lower precision).  Returns ``(out (B, H, 1, d), kv', z')``.  The
    same numbers as :func:`efficient_attention.kernels.linear_attention` over one position with
    ``initial_state``.

    A decoding step is host-bound (each op costs ~9 us of launch time on an H200 against a few ns of work), so
    the one-row products are broadcast multiplies and sums (one kernel each) rather than ``matmul`` (which
    reshapes its operands with four views), and the division takes one ``where`` instead of
    :func:`safe_divide`'s four kernels: 14 ops with ``z`` and ``decay``.
    """
    dt = kv.dtype
    # no product autocast would run in a lower precision (no matmul): the sums keep their dtype under autocast
    q, k = q.to(dt), k.to(dt)
    if torch.promote_types(v.dtype, dt) != dt:  # a lower-precision v is promoted by addcmul: no cast needed
        v = v.to(dt)
    k_t = k.transpose(-1, -2)  # (B, H, m, 1)
    kv = torch.addcmul(kv if decay is None else kv * decay, k_t, v)
    q_t = q.transpose(-1, -2)
    out = (q_t * kv).sum(-2, keepdim=True)  # (B, H, 1, d)
    if z is None:
        return out, kv, None
    z_col = torch.add(z.unsqueeze(-1) if decay is None else decay * z.unsqueeze(-1), k_t)  # (B, H, m, 1)
    den = (q_t * z_col).sum(-2, keepdim=True)  # (B, H, 1, 1)
    # den = 0 only where nothing was attended (nonnegative features): the numerator is 0 there too
    return out / den.masked_fill(den <= 0, 1.0), kv, z_col.squeeze(-1)


def segment_weights(
    valid: Optional[Tensor], bsz: int, length: int, num_segments: int, dtype: torch.dtype, device=None
) -> Tensor:
    """Averaging weights ``(B, C, N)`` that turn a sequence into ``C`` segment means (landmarks).

    The valid positions of each row (``valid`` ``(B, N)`` bool, True = real
    token; ``None`` = all real) are split, in order, into ``C`` contiguous
    segments: the valid position of rank ``r`` among ``L`` goes to segment
    ``floor(r * C / L)``.  Padded positions get weight 0, so padding never
    enters a landmark and a padded sequence has the same landmarks as the
    unpadded one.  When ``L < C`` some segments are empty: their rows are all
    zero (callers mask them).  ``weights @ x`` gives the means.
    """
    if valid is None:
        valid = torch.ones(bsz, length, dtype=torch.bool, device=device)
    count = valid.sum(-1, keepdim=True)  # (B, 1)
    rank = torch.cumsum(valid.long(), dim=-1) - 1
    seg = torch.div(rank * num_segments, count.clamp_min(1), rounding_mode="floor")
    seg = torch.where(valid, seg, torch.full_like(seg, num_segments))  # padding -> a dropped bin
    onehot = F.one_hot(seg, num_segments + 1)[..., :num_segments].transpose(-1, -2).to(dtype)  # (B, C, N)
    sizes = onehot.sum(-1, keepdim=True)
    return onehot / sizes.clamp_min(1)


class LengthChunks:
    """A length split into ``n`` chunks of ``size`` as an extra batch dimension, so that no product reduces over
    the whole length: on CUDA a ``(C, L) @ (L, d)`` product with small ``C, d`` (a landmark summary, or the
    gradient of a product with landmarks) runs as a GEMV-like cuBLAS kernel with one tile per batch entry (5 ms of
    LARA's 17 ms at 32k in CAB's setting on an H200); over chunks of 512 it is ``n`` times as many small GEMMs and
    a sum.  One chunk (no split) elsewhere and for lengths that 512 does not divide or below ``MIN_LENGTH``.

    Tensors ``(batch, L, ...)`` become ``(batch·n, size, ...)`` (:meth:`split`, a view of a contiguous tensor);
    a per-batch operand ``(batch, ...)`` is repeated for every chunk by :meth:`repeat` (its gradient sums over the
    chunks: the split reduction) and a per-chunk result summed back by :meth:`total`."""

    SIZE = 512
    MIN_LENGTH = 2048  # shorter: one chunk
    DEVICES = ("cuda",)  # device types that split (tests add "cpu" with small sizes)

    def __init__(self, batch: int, length: int, device: torch.device):
        split = device.type in self.DEVICES and length >= self.MIN_LENGTH and length % self.SIZE == 0
        self.batch, self.n = batch, (length // self.SIZE if split else 1)
        self.size = length // self.n

    def split(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch * self.n, self.size, *x.shape[2:])

    def repeat(self, x: Tensor) -> Tensor:
        if self.n == 1:
            return x
        return x.unsqueeze(1).expand(self.batch, self.n, *x.shape[1:]).reshape(self.batch * self.n, *x.shape[1:])

    def total(self, x: Tensor) -> Tensor:
        return x if self.n == 1 else x.view(self.batch, self.n, *x.shape[1:]).sum(1)

    def per_batch(self, x: Tensor) -> Tensor:
        """``(batch·n, ...)`` -> ``(batch, n, ...)``."""
        return x.view(self.batch, self.n, *x.shape[1:])

    def widen(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """Heads ``x (B, H, L, d)`` (``B·H = batch``) as chunks ``(batch·n, size, d)`` in ``dtype``: read in place
        (the projections' time-first layout, no copy for fp32/fp64) when there is one chunk."""
        fmt = torch.contiguous_format if self.n > 1 else torch.preserve_format
        return self.split(x.to(dtype, memory_format=fmt).flatten(0, 1))


def capturing_cuda_graph(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device: nothing may be read back to the host, and nothing
    the graph reads may be freed or replaced between replays."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def may_keep_derived(t: Tensor) -> bool:
    """Whether a tensor derived from ``t`` (a scaled or cast copy of a weight) may be kept between calls and reused:
    not while ``torch.compile`` traces (the copy must be part of the graph), and not while a CUDA graph is captured
    (a replay would read the copy's memory after the eager cache has replaced or freed it; computed inside the
    graph, the copy follows in-place changes of ``t``, such as Performer's feature redraw)."""
    return not torch.compiler.is_compiling() and not capturing_cuda_graph(t)


def dense_strides(x: Tensor) -> Tuple[int, ...]:
    """``x``'s strides when they lay it out densely (any dimension order: a head view of the time-first
    projections), else the contiguous strides of its shape."""
    expected = 1
    for i in sorted(range(x.dim()), key=x.stride):
        if x.shape[i] != 1 and x.stride(i) != expected:
            strides = [1] * x.dim()
            for j in range(x.dim() - 2, -1, -1):
                strides[j] = strides[j + 1] * x.shape[j + 1]
            return tuple(strides)
        expected *= x.shape[i]
    return tuple(x.stride())


def op_into(op, size, stride: Tuple[int, ...], a: Tensor, b: Tensor) -> Tensor:
    """``op(a, b)`` of shape ``size`` written in a new tensor of strides ``stride`` and ``a``'s dtype (the memory
    layout the next step wants, e.g. the heads of a time-first projection: no copy there); under torch.compile
    just ``op(a, b)`` (Dynamo refuses a strided ``out=``, and Inductor picks its own layouts)."""
    if torch.compiler.is_compiling():
        return op(a, b)
    return op(a, b, out=torch.empty_strided(size, stride, dtype=a.dtype, device=a.device))


def op_new(op, shape, dtype: torch.dtype, *args, **kwargs) -> Tensor:
    """``op(*args, **kwargs)`` written into a new contiguous tensor of ``shape`` and ``dtype`` (the cast in the same
    pass, the layout the next step reads); under torch.compile ``op(*args, **kwargs).to(dtype).contiguous()``:
    AOTAutograd's functional trace of an ``out=`` into a new tensor gives the result the op's own layout, where
    Dynamo's trace assumed the ``out`` tensor's, so a later ``view`` of it fails to compile."""
    if torch.compiler.is_compiling():
        return op(*args, **kwargs).to(dtype).contiguous()
    return op(*args, **kwargs, out=torch.empty(shape, dtype=dtype, device=args[0].device))


def heads_bmm(a: Tensor, b: Tensor, shape, strides: Tuple[int, ...]) -> Tensor:
    """``bmm(a, b)`` (``(B·H, L, d)``) as ``shape`` ``(B, H, L, d)`` laid out with ``strides`` (:func:`dense_strides`
    of the tensor whose gradient or counterpart it is: the heads of a time-first projection, which then merge or
    split without a copy) where its batch and head dims merge; else a plain ``bmm``."""
    bsz, heads, length, d = shape
    if strides[0] != heads * strides[1] or strides[3] != 1 or b.shape[-1] != d:
        return torch.bmm(a, b).view(bsz, heads, length, -1)
    return op_into(torch.bmm, (bsz * heads, length, d), strides[1:], a, b).view(shape)


def copy_into_layout(x: Tensor, shape, strides: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``x`` viewed as ``shape``, copied into a new tensor of ``dtype`` with ``strides`` (:func:`dense_strides` of
    an input: a hand-written backward returns each gradient in its input's layout, so autograd reshapes it back
    to the projections without a copy, and narrows fp32 to half in the same pass)."""
    return torch.empty_strided(shape, strides, dtype=dtype, device=x.device).copy_(x.view(shape))


def _backward_keeps_graph() -> bool:
    """Whether the running backward was asked to keep its graph (``retain_graph=True``: another backward through it
    follows, as in ``gradcheck``); False where this torch cannot tell."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return False


def take_inputs(ctx, *names: str) -> Tuple[Tensor, ...]:
    """The inputs a hand-written backward keeps as ``ctx`` attributes (not ``save_for_backward``), removed from
    ``ctx`` so that each is freed once the backward drops it; left on ``ctx`` when the backward keeps its graph
    (``retain_graph=True``).  A second backward through a graph that was not kept finds them gone: a clear error,
    not a wrong gradient."""
    if not all(hasattr(ctx, n) for n in names):
        raise RuntimeError("this attention's backward frees its inputs: it runs once per graph (no retain_graph)")
    taken = tuple(getattr(ctx, n) for n in names)
    if not torch.compiler.is_compiling() and not _backward_keeps_graph():  # (a compiled graph frees its own)
        for n in names:
            delattr(ctx, n)
    return taken


def logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``log(sum(exp(x)))`` over ``dim`` in at least fp32; ``-inf`` for rows that are all ``-inf``.

    Unlike ``torch.logsumexp``, the gradient of an all ``-inf`` row is 0, not NaN
    (a query that sees nothing must not poison the backward pass).
    """
    x = x.to(acc_dtype(x.dtype))
    top = x.detach().amax(dim=dim, keepdim=True)
    top = top.masked_fill(torch.isneginf(top), 0.0)
    total = torch.exp(x - top).sum(dim=dim, keepdim=True)
    empty = total == 0
    out = top + torch.log(total.masked_fill(empty, 1.0))
    return out.masked_fill(empty, float("-inf")).squeeze(dim)


def combine_attention(outs, lses) -> Tuple[Tensor, Tensor]:
    """Exact softmax over the union of disjoint key sets attended separately.

    Each part gives ``out (..., T, d)`` and its log-sum-exp ``lse (..., T)``
    (``-inf`` where the part saw nothing); the union's output is the
    ``exp(lse)``-weighted mean of the parts.  Rows that saw nothing anywhere
    give 0, and their gradients are 0 (never NaN).  Returns ``(out, lse)``;
    gradients flow through the weights.
    """
    lse = torch.stack([l.to(acc_dtype(l.dtype)) for l in lses])
    total = logsumexp(lse, dim=0)
    weights = torch.exp(lse - total.masked_fill(torch.isneginf(total), 0.0))  # 0 for empty parts / rows
    out = sum(w[..., None].to(o.dtype) * o for w, o in zip(weights, outs))
    return out, total
