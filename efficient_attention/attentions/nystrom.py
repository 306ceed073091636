"""Nyströmformer (Xiong et al., 2021): softmax attention through a Nyström approximation on landmarks.

``softmax(QKᵀ/√d) V ≈ softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · softmax(Q̃ Kᵀ/√d) V`` with
landmarks ``Q̃, K̃`` = segment means of the queries and keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import Capabilities, Pattern
from ..functional import LengthChunks, acc_dtype, copy_into_layout, dense_strides, segment_weights, softmax, take_inputs
from ..kernels.backends import triton_interpreted, triton_reason
from ..options import AttentionOptions, positive_int
from ..registry import register_attention

__all__ = ["NystromAttention", "Nystromformer"]

logger = logging.getLogger(__name__)

_TRITON_CORE: dict = {}  # "failed": why the Triton landmark core cannot run (then the PyTorch ops run)


class _NewtonSchulz(torch.autograd.Function):
    """``iterations`` Newton-Schulz steps ``Z <- Z (13 I - X (15 I - X (7 I - X))) / 4``, ``X = A Z``, from ``Z₀``
    for ``A``, ``Z₀`` ``(batch, C, C)``: one autograd node whose backward runs the steps' reverse mode by hand
    (eight products a step; autograd over the same products records about 25 ops a step).  The forward keeps
    ``X``, ``7 I - X``, ``15 I - X (7 I - X)`` and the step's ``(13 I - ...) / 4`` (``C x C`` each)."""

    @staticmethod
    def forward(ctx, a: Tensor, z: Tensor, iterations: int) -> Tensor:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        eye7 = eye * 7
        saved = [a]
        for _ in range(iterations):
            x = torch.bmm(a, z)
            p1 = torch.sub(eye7, x)
            p2 = torch.baddbmm(eye, x, p1, beta=15, alpha=-1)
            p3 = torch.baddbmm(eye, x, p2, beta=3.25, alpha=-0.25)  # (13 I - X P2) / 4
            saved += [z, x, p1, p2, p3]
            z = torch.bmm(z, p3)
        ctx.save_for_backward(*saved)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        """The transposed reverse mode (``Gᵀ`` of every gradient ``G``), so no saved matrix needs a transpose:
        ``dP3ᵀ = Gᵀ Z``, ``dP2ᵀ = -¼ dP3ᵀ X``, ``dXᵀ = dP2ᵀ X - ¼ P2 dP3ᵀ - P1 dP2ᵀ``, ``dAᵀ += Z dXᵀ`` and the
        step input's ``Gᵀ = P3 Gᵀ + dXᵀ A``."""
        a, *saved = ctx.saved_tensors
        gt = grad.transpose(-1, -2)
        grad_at = None
        for i in range(len(saved) // 5 - 1, -1, -1):
            z, x, p1, p2, p3 = saved[5 * i : 5 * i + 5]
            d3 = torch.bmm(gt, z)
            d2 = torch.baddbmm(d3, d3, x, beta=0, alpha=-0.25)  # the input is ignored at beta 0
            dx = torch.baddbmm(torch.bmm(d2, x), p2, d3, alpha=-0.25)
            dx = torch.baddbmm(dx, p1, d2, alpha=-1)
            grad_at = torch.bmm(z, dx) if grad_at is None else torch.baddbmm(grad_at, z, dx)
            gt = torch.baddbmm(torch.bmm(p3, gt), dx, a)
        return None if grad_at is None else grad_at.transpose(-1, -2), gt.transpose(-1, -2), None


def _few_keys(x: Tensor, keys: Tensor, values: Tensor, scale: float):
    """``softmax(x Kᵀ·scale) V`` for long ``x (B, H, L, d)`` as given and few keys and values ``(B·H, C, d)`` in the
    accumulation dtype: ``(out (B·H·n, l, d), keys·scale, probabilities (B·H·n, l, C))`` in chunks of the length
    (:class:`LengthChunks`)."""
    bsz, heads, length, d = x.shape
    chunks = LengthChunks(bsz * heads, length, x.device)
    keys = keys * scale
    scores = torch.bmm(chunks.widen(x, keys.dtype), chunks.repeat(keys.transpose(1, 2)))
    probs = torch.softmax(scores, dim=-1)  # (B·H·n, l, C)
    del scores
    return torch.bmm(probs, chunks.repeat(values)), keys, probs


def _few_keys_grads(grad: Tensor, x: Tensor, keys: Tensor, values: Tensor, probs: Tensor, scale: float):
    """:func:`_few_keys`'s backward from its output's gradient ``grad (B, H, L, d)``, its input ``x`` and its
    saved scaled keys and probabilities: ``(d scores (B·H·n, l, C), d keys, d values)``; ``dx`` is
    :func:`_few_keys_dx` of the first (made by the caller when it suits its peak memory)."""
    bsz, heads, length, d = x.shape
    chunks = LengthChunks(bsz * heads, length, x.device)
    g = chunks.widen(grad, keys.dtype)
    d_values = chunks.total(torch.bmm(probs.transpose(1, 2), g))  # (B·H, C, d)
    d_probs = torch.bmm(g, chunks.repeat(values.transpose(1, 2)))  # (B·H·n, l, C)
    del g
    d_scores = torch.ops.aten._softmax_backward_data(d_probs, probs, -1, keys.dtype)
    del d_probs
    d_keys = chunks.total(torch.bmm(d_scores.transpose(1, 2), chunks.widen(x, keys.dtype))).mul_(scale)
    return d_scores, d_keys, d_values


def _few_keys_dx(d_scores: Tensor, keys: Tensor, batch: int, length: int) -> Tensor:
    """``dx (B·H·n, l, d)`` (accumulation dtype) of :func:`_few_keys` from its scores' gradient and scaled keys."""
    return torch.bmm(d_scores, LengthChunks(batch, length, keys.device).repeat(keys))


def _few_queries(queries: Tensor, k: Tensor, v: Tensor):
    """``softmax(Q kᵀ) v`` for few queries ``Q (B·H, C, d)`` (scaled, accumulation dtype) and long keys and values
    ``(B, H, L, d)`` as given: ``(out (B·H, C, d), probabilities (B·H·n, C, l))``, products over chunks of the
    length."""
    bsz, heads, length, d = k.shape
    chunks = LengthChunks(bsz * heads, length, k.device)
    scores = chunks.per_batch(torch.bmm(chunks.repeat(queries), chunks.widen(k, queries.dtype).transpose(1, 2)))
    # the softmax over the keys of every chunk (B·H·n, C, l)
    probs = scores.sub_(torch.logsumexp(scores, dim=(1, 3), keepdim=True)).exp_().flatten(0, 1)
    return chunks.total(torch.bmm(probs, chunks.widen(v, queries.dtype))), probs


def _few_queries_grads(
    grad: Tensor,
    queries: Tensor,
    probs: Tensor,
    out: Tensor,
    kv: List[Tensor],
    finish_dk: Callable[[Tensor], Tensor],
):
    """:func:`_few_queries`'s backward from its output's gradient ``grad (B·H, C, d)``: ``(d queries,
    finish_dk(dk), dv (B·H·n, l, d))``, ``dk (B·H·n, l, d)`` and ``dv`` in the accumulation dtype.  ``kv`` is the
    list ``[k, v]`` (``(B, H, L, d)`` as given), emptied here: with no other reference left, ``k`` and ``v`` (views
    of the projections' one buffer, in self attention) are freed once read, before ``dk`` and ``dv`` are made (the
    peak of a noncausal step: that buffer beside the three gradients).  ``finish_dk`` (e.g. the copy into ``k``'s
    layout and dtype) runs before ``dv`` is computed, so at most one ``(L, d)`` gradient in the accumulation dtype
    is alive."""
    k, v = kv
    kv.clear()
    bsz, heads, length, d = k.shape
    chunks = LengthChunks(bsz * heads, length, k.device)
    d_probs = torch.bmm(chunks.repeat(grad), chunks.widen(v, queries.dtype).transpose(1, 2))  # (B·H·n, C, l)
    del v
    # softmax over all keys: dS = P (dP - Σ_m P dP), Σ_m P dP = out·grad
    d_scores = d_probs.sub_(chunks.repeat((out * grad).sum(-1, keepdim=True))).mul_(probs)
    d_queries = chunks.total(torch.bmm(d_scores, chunks.widen(k, queries.dtype)))  # (B·H, C, d)
    del k
    dk = finish_dk(torch.bmm(d_scores.transpose(1, 2), chunks.repeat(queries)))
    del d_scores
    return d_queries, dk, torch.bmm(probs.transpose(1, 2), chunks.repeat(grad))


class _FewKeys(torch.autograd.Function):
    """:func:`_few_keys` as one autograd node that keeps ``x`` as given (no fp32 copy) and the ``(L, C)``
    probabilities, its backward by hand.  Returns ``(B, H, L, d)`` in ``out_dtype``, laid out as ``x`` (the
    time-first projections: the heads merge as a view)."""

    @staticmethod
    def forward(ctx, x: Tensor, keys: Tensor, values: Tensor, scale: float, out_dtype: torch.dtype) -> Tensor:
        out, keys, probs = _few_keys(x, keys, values, scale)
        ctx.save_for_backward(keys, values, probs)  # the keys scaled
        ctx.x, ctx.scale = x, scale  # an input on ctx: the backward drops it once read
        return copy_into_layout(out, x.shape, dense_strides(x), out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        keys, values, probs = ctx.saved_tensors
        (x,) = take_inputs(ctx, "x")
        with torch.autocast(grad.device.type, enabled=False):
            d_scores, d_keys, d_values = _few_keys_grads(grad, x, keys, values, probs, ctx.scale)
            dx = _few_keys_dx(d_scores, keys, x.shape[0] * x.shape[1], x.shape[2])
            return copy_into_layout(dx, x.shape, dense_strides(x), x.dtype), d_keys, d_values, None, None


class _FewQueries(torch.autograd.Function):
    """:func:`_few_queries` as one autograd node that keeps ``k, v`` as given (no fp32 copies) and the ``(C, L)``
    probabilities, its backward by hand.  Returns ``(B·H, C, d)``."""

    @staticmethod
    def forward(ctx, queries: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, probs = _few_queries(queries, k, v)
        ctx.save_for_backward(queries, probs, out)
        ctx.k, ctx.v = k, v  # inputs on ctx: the backward drops each once read
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        queries, probs, out = ctx.saved_tensors
        kv = list(take_inputs(ctx, "k", "v"))  # (no other reference: _few_queries_grads frees them once read)
        (k_shape, k_strides, k_dtype), (v_shape, v_strides, v_dtype) = [
            (x.shape, dense_strides(x), x.dtype) for x in kv
        ]
        with torch.autocast(grad.device.type, enabled=False):
            d_queries, dk, dv = _few_queries_grads(
                grad, queries, probs, out, kv, lambda dk: copy_into_layout(dk, k_shape, k_strides, k_dtype)
            )
            return d_queries, dk, copy_into_layout(dv, v_shape, v_strides, v_dtype)


def _segment_means(x: Tensor, c: int, scale: float) -> Tensor:
    """Means of ``c`` equal segments of ``x (B, H, L, d)`` times ``scale``: ``(B·H, C, d)`` in the accumulation
    dtype, no ``(L, d)`` copy of ``x``."""
    return x.flatten(0, 1).unflatten(1, (c, x.shape[2] // c)).sum(-2, dtype=acc_dtype(x.dtype)) * (
        scale / (x.shape[2] // c)
    )


class _NystromEven(torch.autograd.Function):
    """:meth:`NystromAttention._attend_even` with the Triton landmark core (``kernels/_triton_nystrom.py``) as one
    autograd node: segment means, :func:`_few_queries`, the core, :func:`_few_keys` forward, their backwards by
    hand, the means' gradients added to ``dq, dk`` before they are narrowed (no autograd node or op per small
    tensor).  Returns ``(B, H, L, d)`` in ``out_dtype``, laid out as ``q``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, c: int, scale: float, iterations: int, out_dtype: torch.dtype):
        from ..kernels._triton_nystrom import core_forward

        q_land, k_land = _segment_means(q, c, scale), _segment_means(k, c, 1.0)  # (B·H, C, d)
        w, w_probs = _few_queries(q_land, k, v)
        small, a, zs = core_forward(q_land, k_land, w, iterations)
        out, keys, probs = _few_keys(q, k_land, small, scale)
        ctx.save_for_backward(q_land, k_land, w, w_probs, small, a, zs, keys, probs)
        ctx.c, ctx.scale, ctx.q, ctx.k, ctx.v = c, scale, q, k, v  # inputs on ctx: dropped once read
        return copy_into_layout(out, q.shape, dense_strides(q), out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        from ..kernels._triton_nystrom import core_backward

        q_land, k_land, w, w_probs, small, a, zs, keys, probs = ctx.saved_tensors
        q, *kv = take_inputs(ctx, "q", "k", "v")  # (the only references: each is dropped once read)
        bsz, heads, length, d = shape = q.shape
        (k_strides, k_dtype), (v_strides, v_dtype) = [(dense_strides(x), x.dtype) for x in kv]
        batch, c, scale = bsz * heads, ctx.c, ctx.scale
        with torch.autocast(grad.device.type, enabled=False):
            # each (L, d) gradient leaves the accumulation dtype before the next is computed (peak memory: one
            # such buffer, as for the two autograd nodes of the PyTorch path), q, k, v are gone before dk, dv,
            # and dq is made last, from its scores' gradient ((L, C), kept): while the keys' side widens k and v
            # (q, k, v share the projections' buffer until all three are dropped) no (L, d) gradient exists yet
            d_scores, d_keys, d_small = _few_keys_grads(grad, q, keys, small, probs, scale)
            q_strides, q_dtype = dense_strides(q), q.dtype
            del q
            d_ql, d_kl, d_w = core_backward(q_land, k_land, w, a, zs, d_small)
            seg = length // c  # every position of a segment gets its mean's gradient

            def finish_dk(dk: Tensor) -> Tensor:
                dk = dk.view(batch, c, seg, d).add_(d_kl.add_(d_keys).mul_(1.0 / seg).unsqueeze(2))
                return copy_into_layout(dk, shape, k_strides, k_dtype)

            d_ql2, dk, dv = _few_queries_grads(d_w, q_land, w_probs, w, kv, finish_dk)
            dv = copy_into_layout(dv, shape, v_strides, v_dtype)
            dq = _few_keys_dx(d_scores, keys, batch, length).view(batch, c, seg, d)
            del d_scores
            dq.add_(d_ql.add_(d_ql2).mul_(scale / seg).unsqueeze(2))  # the queries' means
            return copy_into_layout(dq, shape, q_strides, q_dtype), dk, dv, None, None, None, None


def iterative_pinv(a: Tensor, iterations: int, stochastic: bool = False) -> Tensor:
    """Newton-Schulz pseudo-inverse of a batch of square matrices (the paper's 3rd-order iteration).

    ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖_∞)`` (per matrix), then
    ``Z ← ¼ Z (13 I - AZ (15 I - AZ (7 I - AZ)))``.  Zero rows/columns stay zero.  ``stochastic=True`` declares
    every row a probability vector (a softmax without empty rows): then ``‖A‖_∞ = 1`` and ``|A| = A`` need
    no kernels.
    """
    size = a.shape[-1]
    flat = a.reshape(-1, size, size)
    if stochastic:
        z = flat.transpose(-1, -2) / flat.sum(-2).amax(-1)[:, None, None]  # max column sum >= 1: no clamp
    else:
        norm1 = flat.abs().sum(-2).amax(-1)
        norm_inf = flat.abs().sum(-1).amax(-1)
        z = flat.transpose(-1, -2) / (norm1 * norm_inf).clamp_min(torch.finfo(a.dtype).tiny)[:, None, None]
    return _NewtonSchulz.apply(flat, z, iterations).view_as(a)


def _fused_core_ok(dtype: torch.dtype, device: torch.device, c: int, d: int) -> bool:
    """Whether the landmark core runs as Triton kernels (:func:`landmark_core`, :class:`_NystromEven`) for ``C``
    landmarks of head dim ``d`` computed in ``dtype``: fp32 on CUDA (CPU tensors under Triton's interpreter), at
    most 64 landmarks (the kernels keep a dozen ``C x C`` tiles in registers), ``d <= 128``, not under
    ``torch.compile`` (it traces the PyTorch ops)."""
    return (
        dtype == torch.float32
        and (device.type == "cuda" or triton_interpreted())
        and c <= 64
        and d <= 128
        and "failed" not in _TRITON_CORE
        and not torch.compiler.is_compiling()
        and triton_reason() is None
    )


def _triton_failed(exc: Exception) -> None:
    """Turns the Triton landmark core off for this process (logged once at WARNING)."""
    _TRITON_CORE["failed"] = f"{type(exc).__name__}: {exc}"
    logger.warning("Nystromformer: the Triton landmark core cannot run (%s); using PyTorch ops", exc)


def landmark_core(q_land: Tensor, k_land: Tensor, w: Tensor, iterations: int) -> Tensor:
    """``pinv(softmax(q_land k_landᵀ)) w`` for ``(B·H, C, d)`` landmarks (the queries' scaled), the pseudo-inverse
    :func:`iterative_pinv`'s stochastic one: on CUDA two Triton launches (forward, backward) for what is ~80 tiny
    ATen ops (``kernels/_triton_nystrom.py``), else the PyTorch ops.  Returns ``(B·H, C, d)``."""
    if _fused_core_ok(q_land.dtype, q_land.device, q_land.shape[1], q_land.shape[2]):
        try:
            from ..kernels._triton_nystrom import NystromCore

            return NystromCore.apply(q_land.contiguous(), k_land.contiguous(), w.contiguous(), iterations)
        except Exception as exc:  # noqa: BLE001 - a missing or failing Triton falls back to the PyTorch ops
            _triton_failed(exc)
    kernel2 = torch.softmax(torch.bmm(q_land, k_land.transpose(1, 2)), dim=-1)  # (B·H, C, C)
    return torch.bmm(iterative_pinv(kernel2, iterations, stochastic=True), w)


@dataclass(frozen=True)
class NystromOptions(AttentionOptions):
    num_landmarks: int = positive_int(16, "number of landmarks C (segment means of queries and keys)")
    conv_kernel_size: Optional[int] = positive_int(
        None, "odd kernel size of the depthwise convolution on the values added to the output (None: none)", odd=True
    )
    pinv_iterations: int = positive_int(6, "Newton-Schulz iterations of the pseudo-inverse")


@register_attention("nystrom", "nystromformer")
class NystromAttention(EfficientAttention):
    """Nyström-approximated softmax attention, noncausal self attention.

    Math: ``F = softmax(Q K̃ᵀ/√d)``, ``A = softmax(Q̃ K̃ᵀ/√d)``,
    ``B = softmax(Q̃ Kᵀ/√d)``; ``out = F · pinv(A) · (B V)`` (+ a depthwise
    convolution of ``V`` along the sequence when ``conv_kernel_size`` is set).
    ``Q̃, K̃``: means of ``num_landmarks`` contiguous segments of the real
    (unpadded) tokens, so padding never enters a landmark.  A sequence with
    at most ``num_landmarks`` real tokens gets exact softmax attention.  The
    pseudo-inverse is ``pinv_iterations`` Newton-Schulz steps; everything runs
    in fp32 for fp16/bf16 inputs.

    Shapes: q/k/v ``(B, H, N, d)``, landmarks ``(B, H, C, d)``.  Pattern:
    noncausal self only.  ``key_padding_mask`` honoured, no ``attn_mask``;
    no attention dropout (the paper has none).

    Cost: O(N·C·d + C³) time and O(N·C + C²) memory per head.
    """

    capabilities = Capabilities(patterns=frozenset({Pattern.NONCAUSAL_SELF}), backends=("triton", "torch"))
    Options = NystromOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        conv_kernel_size = self.conv_kernel_size
        self.conv = None
        if conv_kernel_size is not None:
            self.conv = nn.Conv2d(
                self.num_heads,
                self.num_heads,
                (conv_kernel_size, 1),
                padding=(conv_kernel_size // 2, 0),
                groups=self.num_heads,
                bias=False,
            )
        if self.dropout_p > 0:
            logger.info("Nystromformer applies no attention dropout (dropout=%s is unused)", self.dropout_p)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        # autocast off: everything, the pseudo-inverse included, runs in fp32 as documented; autocast would
        # otherwise cast every operand of every product back to half (two casts per product: most of the host time)
        with torch.autocast(q.device.type, enabled=False):
            return self._attend_fp32(q, k, v, masks)

    def _attend_fp32(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks):
        bsz, heads, length, d = q.shape
        kpm = masks.key_padding
        if kpm is None and length > self.num_landmarks and length % self.num_landmarks == 0:
            return self._attend_even(q, k, v), None
        dtype = acc_dtype(q.dtype)
        q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
        if kpm is not None:
            v32 = v32.masked_fill(kpm[:, None, :, None], 0.0)
        valid = None if kpm is None else ~kpm
        weights = segment_weights(valid, bsz, length, self.num_landmarks, dtype, q.device)
        empty = weights.sum(-1) == 0  # (B, C) landmarks without tokens
        weights = weights.unsqueeze(1)
        # the 1/sqrt(d) scaling is folded into the (B, H, C, d) landmarks, never applied to an (N, C) product
        q_land, k_land = torch.matmul(weights, q32) * self.scaling, torch.matmul(weights, k32)  # (B, H, C, d)
        no_land = empty[:, None, None, :]
        kernel1 = softmax(
            torch.matmul(q32, k_land.transpose(-1, -2) * self.scaling).masked_fill(no_land, float("-inf"))
        )
        kernel2 = softmax(torch.matmul(q_land, k_land.transpose(-1, -2)).masked_fill(no_land, float("-inf")))
        scores3 = torch.matmul(q_land, k32.transpose(-1, -2))
        if kpm is not None:
            scores3 = scores3.masked_fill(kpm[:, None, None, :], float("-inf"))
        kernel3 = softmax(scores3)
        row_empty = empty[:, None, :, None]
        kernel2 = kernel2.masked_fill(row_empty, 0.0).to(dtype)
        kernel3 = kernel3.masked_fill(row_empty, 0.0).to(dtype)
        kernel1 = kernel1.to(dtype)
        small = torch.matmul(iterative_pinv(kernel2, self.pinv_iterations), torch.matmul(kernel3, v32))  # (B, H, C, d)
        if kpm is None:  # known on the host: no synchronisation
            if length <= self.num_landmarks:  # one token per landmark: kernel1 is exact softmax attention
                small = torch.matmul(weights, v32)
        else:  # rows with at most num_landmarks real tokens use the exact landmark values
            short = (~kpm).sum(-1).reshape(-1, 1, 1, 1) <= self.num_landmarks
            small = torch.where(short, torch.matmul(weights, v32), small)
        out = torch.matmul(kernel1, small)
        if self.conv is not None:
            pad = (self.conv.padding[0], 0)
            out = out + F.conv2d(v32, self.conv.weight.to(dtype), padding=pad, groups=self.num_heads)
        return out.to(q.dtype), None

    def _attend_even(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:meth:`_attend_fp32` without padding for a length that is a multiple of (and above) the number of
        landmarks: equal segments (means of views, no weights), no empty landmark or row (plain softmaxes, the
        stochastic pseudo-inverse), and products batched over ``B·H`` (and over chunks of the length on CUDA,
        :class:`LengthChunks`: no product reduces over the whole length, forward or backward) that read the
        time-first projections in place when there is one chunk (a head view of ``(L, B, H·d)`` flattens to
        ``(B·H, L, d)`` without a copy)."""
        heads, c, dtype = q.shape[1], self.num_landmarks, acc_dtype(q.dtype)
        out_dtype = q.dtype if self.conv is None else dtype
        out = None
        if _fused_core_ok(dtype, q.device, c, q.shape[-1]):
            try:
                out = _NystromEven.apply(q, k, v, c, self.scaling, self.pinv_iterations, out_dtype)
            except Exception as exc:  # noqa: BLE001 - a missing or failing Triton falls back to the PyTorch ops
                _triton_failed(exc)
        if out is None:
            q_land, k_land = _segment_means(q, c, self.scaling), _segment_means(k, c, 1.0)
            small = landmark_core(q_land, k_land, _FewQueries.apply(q_land, k, v), self.pinv_iterations)
            out = _FewKeys.apply(q, k_land, small, self.scaling, out_dtype)  # (B, H, L, d)
        if self.conv is None:
            return out
        pad = (self.conv.padding[0], 0)
        return (out + F.conv2d(v.to(dtype), self.conv.weight.to(dtype), padding=pad, groups=heads)).to(q.dtype)


Nystromformer = NystromAttention
