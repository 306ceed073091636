"""ABC (Peng et al., 2021): attention over a bounded memory of ``n`` learned-control slots.

``K̃_l = Σ_j α_jl k_j``, ``Ṽ_l = Σ_j α_jl v_j`` with ``α_·l = softmax_j(w_l·k_j)``;
``out_i = softmax_l(q_i·K̃_l / √d) Ṽ`` -- softmax attention over ``n`` slots instead of ``S`` keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import acc_dtype, dense_strides, heads_bmm, op_new, softmax
from ..kernels.abc_step import abc_step, empty_norm
from ..kernels.backends import TRITON_DTYPES, triton_interpreted, triton_probe, triton_reason
from ..kernels.linear_attention import linear_attention
from ..options import AttentionOptions, positive_int
from ..registry import register_attention

__all__ = ["ABC"]


def _fused_slots(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether causal training's slot weights and slot read (slot tensors ``x (B, H, S, n)``, the kernels' dtype
    ``dtype``) run on the Triton kernels of ``kernels/_triton_abc.py`` (six launches where the ATen ops are about
    37): CUDA (CPU tensors under Triton's interpreter), fp16 / bf16 / fp32, at most 128 slots, not under
    ``torch.compile`` (Inductor fuses the ATen ops itself), and the kernels compile and run here (tried once per
    device, dtype and slot count: a failure is logged and the ATen ops run).  Any length: with the scans split
    into segments they beat the ATen ops at every length measured (H200, CAB's setting, session 14: 1.22x at 4k,
    1.24x at 8k, 1.42x at 32k; the step's GPU time 1.58 against 2.26 ms at 8k)."""
    ok = (
        (x.device.type == "cuda" or triton_interpreted())
        and dtype in TRITON_DTYPES
        and x.shape[-1] <= 128
        and not torch.compiler.is_compiling()
        and triton_reason() is None
    )
    if not ok:
        return False
    from ..kernels import _triton_abc

    key = ("abc slots", x.device, dtype, x.shape[-1])
    return triton_probe(key, lambda: _triton_abc.probe_slots(x.device, dtype, x.shape[-1]), "ABC (causal)")


class _SlotRead(torch.autograd.Function):
    """``r = softmax_l(num · e^{nl} · scale) · e^{nl}`` (dropout ``mask`` on the softmax) for the unnormalised slot
    scores ``num`` and the negated log normalisers ``nl = -log Σ_j e_jl`` (both ``(B, H, T, n)``, fp32 or fp64);
    slots with a normaliser at or below :func:`~efficient_attention.kernels.abc_step.empty_norm` are left out
    (weight 0).  Every row needs a non-empty slot (a causal query without padding: its running-max slot has a
    normaliser >= 1).

    One autograd node: forward about ten kernels, backward about twelve (autograd over the same ops records about
    twenty-five); where :func:`_fused_slots` (contiguous inputs), one Triton kernel each way, keeping ``num`` and
    ``nl`` and recomputing the rest.  Else it keeps the logits (empty slots at the lowest finite value) and ``nl``;
    with ``recompute`` (``nl`` comes from :class:`_SlotWeights`, which keeps it too) it recomputes the
    probabilities and ``e^{nl}`` in the backward (four kernels): one ``(B, H, T, n)`` fp32 tensor of its own
    instead of three."""

    @staticmethod
    def forward(
        ctx, num: Tensor, nl: Tensor, scale: float, mask: Optional[Tensor], dtype: torch.dtype, recompute: bool
    ) -> Tensor:
        ctx.fused = num.is_contiguous() and nl.is_contiguous() and num.dtype == nl.dtype == torch.float32
        ctx.fused = ctx.fused and _fused_slots(num, dtype)
        ctx.fused = ctx.fused and (mask is None or mask.is_contiguous())
        if ctx.fused:
            from ..kernels._triton_abc import slot_read

            ctx.save_for_backward(num, nl, mask)
            ctx.scale = scale
            return slot_read(num, nl, mask, scale, -math.log(empty_norm(nl.dtype)), dtype)
        empty = nl >= -math.log(empty_norm(nl.dtype))
        inv = _SlotRead._inverse(nl, empty)
        x = torch.mul(num, inv).mul_(scale).masked_fill_(empty, torch.finfo(nl.dtype).min)
        p = torch.softmax(x, dim=-1)
        ctx.save_for_backward(x, nl, mask, *(() if recompute else (inv, p)))
        ctx.scale, ctx.recompute = scale, recompute
        pd = p if mask is None else p * mask
        return pd * inv if dtype == pd.dtype else torch.mul(pd, inv, out=torch.empty_like(pd, dtype=dtype))

    @staticmethod
    def _inverse(nl: Tensor, empty: Optional[Tensor] = None) -> Tensor:
        """``e^{nl}`` = 1 / normaliser; ``empty`` slots (default: at or above the bound): 0."""
        empty = nl >= -math.log(empty_norm(nl.dtype)) if empty is None else empty
        return torch.exp(nl).masked_fill_(empty, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.fused:
            from ..kernels._triton_abc import slot_read_grad

            num, nl, mask = ctx.saved_tensors
            bound = -math.log(empty_norm(nl.dtype))
            return (*slot_read_grad(grad.contiguous(), num, nl, mask, ctx.scale, bound), None, None, None, None)
        x, nl, mask, *kept = ctx.saved_tensors
        inv, p = (_SlotRead._inverse(nl), torch.softmax(x, dim=-1)) if ctx.recompute else kept
        dp = grad * inv if mask is None else grad * inv * mask  # promoted to p's dtype
        dx = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # 0 on empty slots (p = 0 there)
        # d nl = (g·pd + dx·num·scale)·inv = dp·p + dx·x
        return torch.mul(dx, inv).mul_(ctx.scale), torch.addcmul(dx * x, dp, p), None, None, None, None


def _dense(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` as a contiguous ``dtype`` tensor: itself if it is one, else one copy kernel (with the cast)."""
    if x.dtype == dtype and x.is_contiguous():
        return x
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _accumulates_heads(grad: Tensor) -> bool:
    """Whether a product may be added into ``grad (B, H, S, d)`` in place through its ``(B·H, S, d)`` view: eager
    mode (under torch.compile the graph's gradients are not ours to mutate), dense (no expanded zeros), and the
    batch and head dims merging (the heads of a time-first or a contiguous layout)."""
    return (
        not torch.compiler.is_compiling()
        and dense_strides(grad) == grad.stride()
        and grad.stride(0) == grad.shape[1] * grad.stride(1)
        and grad.stride(-1) == 1
    )


def _slot_matrix(w: Tensor, bsz: int, dtype: torch.dtype) -> Tensor:
    """The slot projection ``w (H, n, d)`` as ``(B·H, d, n)`` in ``dtype`` for products batched over ``B·H``: one
    copy kernel (the cast and the batch broadcast; ``repeat`` takes a dozen ops)."""
    heads, slots, d = w.shape
    out = torch.empty(bsz, heads, d, slots, dtype=dtype, device=w.device)
    return out.copy_(w.transpose(1, 2)).view(bsz * heads, d, slots)


class _SlotWeights(torch.autograd.Function):
    """The slot weights of a fresh causal sequence from its keys ``k (B, H, S, d)`` (contiguous) and the slot
    projection ``w (H, n, d)``: the scores ``a = k wᵀ`` (in ``k``'s dtype), their running max
    ``c_i = max_{j<=i, l} a_jl`` and

    * ``e = exp(a - c)`` ``(B, H, S, n)`` in ``k``'s dtype (the linear attentions' values / keys),
    * ``nl = c - logcumsumexp_j(a)`` ``(B, H, S, n)`` fp32 (``-log Σ_{j<=i} e^{a_jl - c_i}``; only with ``scan``,
      else None: the CPU's ``logcumsumexp`` is a scalar loop),
    * ``k_read``: ``k`` itself (a view), for the slot scores' linear attention to read: the gradient that attention
      gives ``k`` then reaches this node, which adds ``da w`` into it in place (one product) instead of autograd
      summing two ``(B, H, S, d)`` gradients into a third (the peak of a causal ABC step at 8k in CAB's setting was
      that third tensor's allocation: 380 -> 356 MiB in ``benchmarks/host_ops.py``'s CUDA replica, where SDPA's
      step peaks at 357),
    * ``decay = c_{i-1} - c_i`` ``(B, H, S)`` fp32, 0 at ``i = 0`` (the linear attentions' log decay; no gradient).

    The non-differentiable ``decay`` comes last: under torch.compile (2.13) a Function returning None (``nl``
    without ``scan``), then a non-differentiable output, then a differentiable one gets no gradient for the last
    (``k_read``'s, so a compiled step's ``dk`` was wrong; ``tests/test_compile.py`` trains every mechanism
    compiled).

    One autograd node where autograd records about ten: the normalisers are one ``logcumsumexp`` along the last
    dim of a ``(B, H, n, S)`` fp32 copy (CUDA scans an inner dim with parallel blocks).  Backward:
    ``da = de·e - Σ_{i>=j} g_i e^{a_j - lse_i}`` (the positive and negative parts of ``g = dnl`` in one reversed
    scan, in the log domain), then ``dk = dk_read + da w``, ``dw = Σ_b daᵀ k``.  It keeps ``a``, ``e``, ``c`` and
    ``nl`` (which :class:`_SlotRead` keeps too).  Where :func:`_fused_slots`, everything after the product ``a = k wᵀ``
    is one Triton kernel each way (``kernels/_triton_abc.py``: the scans in blocks of positions, the same math),
    and ``e`` is not kept (the backward recomputes ``e^{a - c}``)."""

    @staticmethod
    def forward(ctx, k: Tensor, w: Tensor, scan: bool):
        bsz, heads, length, d = k.shape
        kf, wm = k.flatten(0, 1), _slot_matrix(w, bsz, k.dtype)  # (a view for contiguous and time-first k)
        a = torch.bmm(kf, wm).view(bsz, heads, length, -1)
        ctx.fused = _fused_slots(a, a.dtype)
        if ctx.fused:
            from ..kernels._triton_abc import slot_weights

            e, nl, decay, c = slot_weights(a, scan)
            ctx.save_for_backward(kf, wm, a, c, nl)
            ctx.w_dtype, ctx.k_layout = w.dtype, (k.shape, dense_strides(k))
            ctx.mark_non_differentiable(decay)
            ctx.set_materialize_grads(False)
            return e, nl, k.view_as(k), decay
        top = a.amax(-1)
        run = torch.cummax(torch.cat([top[..., :1], top], -1), -1).values.to(acc_dtype(a.dtype))  # c_{-1} := c_0
        decay, c = run[..., :-1] - run[..., 1:], run[..., 1:].unsqueeze(-1)  # fp32: exact differences of half scores
        e = torch.exp(a - c, out=torch.empty_like(a))  # in fp32, rounded once
        nl = None
        if scan:
            at = torch.empty(bsz, heads, a.shape[-1], length, dtype=c.dtype, device=a.device).copy_(a.transpose(-1, -2))
            nl = op_new(torch.sub, a.shape, c.dtype, c, torch.logcumsumexp(at, -1).transpose(-1, -2))
        ctx.save_for_backward(kf, wm, a, e, c, nl)
        ctx.w_dtype, ctx.k_layout = w.dtype, (k.shape, dense_strides(k))
        ctx.mark_non_differentiable(decay)
        ctx.set_materialize_grads(False)  # (no zero tensor for the decay's gradient, nor for an unused output's)
        return e, nl, k.view_as(k), decay

    @staticmethod
    def _scan_grad(g: Tensor, a: Tensor, c: Tensor, nl: Tensor) -> Tensor:
        """``-Σ_{i>=j} g_i e^{a_j - lse_i}`` ``(B, H, S, n)`` fp32 for ``g = dnl``: the positive and negative parts
        of ``g`` scanned in the log domain, on the positions in reverse order, in one contiguous ``(2, B, H, n, S)``
        fp32 buffer worked in place (the scan along its last dim; only ``(B, H, S, n)``-sized inputs are flipped).
        Built from stacked, transposed and flipped copies it held four such buffers at once: the peak of a causal
        ABC step at 8k in CAB's setting."""
        bsz, heads, length, n = g.shape

        def rev(x: Tensor) -> Tensor:  # (B, H, S, ·) -> (B, H, ·, S), positions reversed
            return x.flip(-2).transpose(-1, -2)

        parts = torch.empty(2, bsz, heads, n, length, dtype=g.dtype, device=g.device)
        parts[0].copy_(rev(g))
        torch.neg(parts[0], out=parts[1])
        parts.clamp_(min=0).log_().add_(rev(nl - c))  # log g_i^± - lse_i (-inf: no part)
        tail = torch.logcumsumexp(parts, -1)  # log Σ_{i>=j} of each part (reversed positions)
        del parts
        both = tail.add_(rev(a)).exp_()
        return torch.sub(both[1], both[0]).flip(-1).transpose(-1, -2)

    @staticmethod
    def backward(ctx, de: Optional[Tensor], dnl: Optional[Tensor], dk_read: Optional[Tensor], _):
        if ctx.fused:
            from ..kernels._triton_abc import slot_weights_grad

            kf, wm, a, c, nl = ctx.saved_tensors
            dnl, de = (None if g is None else g.contiguous() for g in (dnl, de))
            return _SlotWeights._finish(ctx, slot_weights_grad(dnl, de, a, c, nl), kf, wm, dk_read)
        kf, wm, a, e, c, nl = ctx.saved_tensors
        if dnl is None:
            da = torch.zeros_like(a) if de is None else de * e
        else:
            grad = _SlotWeights._scan_grad(dnl, a, c, nl)
            da = grad.to(a.dtype) if de is None else op_new(torch.addcmul, a.shape, a.dtype, grad, de, e)
        return _SlotWeights._finish(ctx, da, kf, wm, dk_read)

    @staticmethod
    def _finish(ctx, da: Tensor, kf: Tensor, wm: Tensor, dk_read: Optional[Tensor]):
        """The gradients of ``k`` (``dk_read``, the gradient of the ``k`` this node returned, plus the scores';
        in ``k``'s layout, as the linear attention's ``dk``) and ``w`` from the scores'."""
        daf = da.view(kf.shape[0], kf.shape[1], -1)
        if dk_read is None:
            dk = heads_bmm(daf, wm.transpose(1, 2), *ctx.k_layout)
        elif _accumulates_heads(dk_read):  # added into it in place: no third (B, H, S, d) tensor
            dk = dk_read
            dk.flatten(0, 1).baddbmm_(daf, wm.transpose(1, 2))
        else:
            dk = torch.baddbmm(dk_read.flatten(0, 1), daf, wm.transpose(1, 2)).view(dk_read.shape)
        heads = da.shape[1]
        dw = torch.bmm(kf.transpose(1, 2), daf).view(-1, heads, *wm.shape[1:]).sum(0, dtype=ctx.w_dtype)
        return dk, dw.transpose(1, 2), None


class _SlotAttention(torch.autograd.Function):
    """``softmax(q K̃ᵀ · scale) Ṽ`` (dropout ``mask`` on the probabilities) for q ``(B, H, T, d)`` and a few slots
    K̃, Ṽ ``(B, H, n, d)``: two products batched over ``B·H`` (``q`` read in place as a head view of the time-first
    projections) and a softmax over ``n``; backward five products and one softmax backward.

    Not SDPA: its fused backward parallelises over key blocks, so ``n`` slots are one block per (batch, head) and
    ``B·H`` programs walk all ``T`` queries (slower than CAB's plain products from 16k on an H200); and it keeps
    its ``(T, d)`` output for the backward where this keeps the ``(T, n)`` probabilities."""

    @staticmethod
    def forward(ctx, q: Tensor, mem_k: Tensor, mem_v: Tensor, scale: float, mask: Optional[Tensor]) -> Tensor:
        qf, kf, vf = q.flatten(0, 1), mem_k.flatten(0, 1) * scale, mem_v.flatten(0, 1)  # the scale on the small side
        p = torch.softmax(torch.bmm(qf, kf.transpose(1, 2)), dim=-1)  # (B·H, T, n)
        ctx.save_for_backward(qf, kf, vf, p, mask)
        ctx.scale, ctx.shapes, ctx.q_strides = scale, (q.shape, mem_k.shape), dense_strides(q)
        pd = p if mask is None else p * mask.flatten(0, 1)
        return heads_bmm(pd, vf, q.shape, ctx.q_strides)  # laid out as q: the heads merge without a copy

    @staticmethod
    def backward(ctx, grad: Tensor):
        qf, kf, vf, p, mask = ctx.saved_tensors
        q_shape, m_shape = ctx.shapes
        g = grad.flatten(0, 1).to(p.dtype)
        pd = p if mask is None else p * mask.flatten(0, 1)
        dp = torch.bmm(g, vf.transpose(1, 2))
        if mask is not None:
            dp = dp * mask.flatten(0, 1)
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
        dq = heads_bmm(ds, kf, q_shape, ctx.q_strides)  # in q's layout: no copy back to the projections
        dk = torch.bmm(ds.transpose(1, 2), qf).mul_(ctx.scale).view(m_shape)
        dv = torch.bmm(pd.transpose(1, 2), g).view(m_shape)
        return dq, dk, dv, None, None


class _SlotMemory(torch.autograd.Function):
    """The key-side memory ``K̃ = α k``, ``Ṽ = α v`` ``(B, H, n, d)`` with ``α = softmax_S(w kᵀ)`` for keys and
    values ``(B, H, S, d)`` (read in place as head views of the time-first projections) and the slot projection
    ``w (H, n, d)``, in ``k``'s dtype: three products batched over ``B·H`` and a softmax over the keys.  One autograd
    node where autograd records five (and the broadcast of ``w``); backward six products (two accumulating) and one
    softmax backward."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, w: Tensor):
        bsz, heads, length, d = k.shape
        kf, vf = k.flatten(0, 1), v.flatten(0, 1)  # (B·H, S, d): views of time-first projections
        wm = _slot_matrix(w, bsz, k.dtype).transpose(1, 2)  # (B·H, n, d)
        alpha = torch.softmax(torch.bmm(wm, kf.transpose(1, 2)), dim=-1)  # (B·H, n, S); half: fp32 inside
        ctx.save_for_backward(kf, vf, wm, alpha)
        ctx.w_dtype, ctx.heads, ctx.layouts = w.dtype, heads, ((k.shape, dense_strides(k)), (v.shape, dense_strides(v)))
        shape = (bsz, heads, -1, d)
        return torch.bmm(alpha, kf).view(shape), torch.bmm(alpha, vf).view(shape)

    @staticmethod
    def backward(ctx, dmk: Optional[Tensor], dmv: Optional[Tensor]):
        kf, vf, wm, alpha = ctx.saved_tensors
        shape = (kf.shape[0], *wm.shape[1:])
        dmk = alpha.new_zeros(shape) if dmk is None else dmk.flatten(0, 1).to(alpha.dtype)
        dmv = alpha.new_zeros(shape) if dmv is None else dmv.flatten(0, 1).to(alpha.dtype)
        dalpha = torch.bmm(dmk, kf.transpose(1, 2)).baddbmm_(dmv, vf.transpose(1, 2))
        ds = torch.ops.aten._softmax_backward_data(dalpha, alpha, -1, alpha.dtype)
        at = alpha.transpose(1, 2)
        (k_shape, k_strides), (v_shape, v_strides) = ctx.layouts  # the gradients in the inputs' layouts: no copies
        dk = heads_bmm(at, dmk, k_shape, k_strides)
        dk.flatten(0, 1).baddbmm_(ds.transpose(1, 2), wm)
        dv = heads_bmm(at, dmv, v_shape, v_strides)
        heads = ctx.heads
        dw = torch.bmm(ds, kf).view(-1, heads, *wm.shape[1:]).sum(0, dtype=ctx.w_dtype)
        return dk, dv, dw


@dataclass(frozen=True)
class ABCOptions(AttentionOptions):
    num_landmarks: int = positive_int(16, "number of memory slots n")


@register_attention("abc")
class ABC(EfficientAttention):
    """Attention with bounded-memory control (ABC-MLP style control, per head).

    Math: slot scores ``a_jl = w_l·k_j`` (``w`` is the parameter
    ``landmark_proj`` ``(H, n, d)``); a query sees the memory of the keys it may
    attend to: ``K̃_l = Σ_j e^{a_jl} k_j / Σ_j e^{a_jl}`` (same for ``Ṽ``), then
    ``out = softmax(q K̃ᵀ / √d) Ṽ``.  Causal queries use the running
    (cumulative) memory and normaliser of the keys up to their position;
    cross attention builds the memory from the key side.

    Shapes: q ``(B, H, T, d)``, k/v ``(B, H, S, d)``, memory ``(B, H, n, d)``.
    Patterns: all four.  Causal attention is three chunked linear attentions
    (:func:`~efficient_attention.kernels.linear_attention.linear_attention`:
    slot scores, slot normalisers, output; never an ``(N, n, d)`` tensor; a
    fresh unpadded sequence, as in training, takes the normalisers from one
    ``logcumsumexp`` instead and the slot softmax as one autograd node), the
    slot weights stabilised in the log domain by the running max of all slot
    scores so far (a slot whose scores stay ~80 below the best slot's
    underflows to empty in fp32); decoding keeps only the running memory,
    normaliser and that max (constant state), and a prefill hands its memory
    to decoding; ``static_kv`` caches the key-side memory.
    ``key_padding_mask`` honoured (padded keys never enter the memory); an
    arbitrary ``attn_mask`` is not.  Dropout is applied to the slot
    probabilities.  Half inputs: scores and weights in fp32, rounded to the
    input dtype for the kernels, which accumulate in fp32.

    Cost: O((T + S)·n·d) time (causal: + O(N·C·(n + d)) for chunks of ``C``);
    O((T + S)·n + n·d) memory per head.
    """

    capabilities = Capabilities(
        patterns=ALL_PATTERNS,
        incremental=True,
        constant_state=True,
        backends=("kernels.linear_attention", "triton", "torch"),
    )
    Options = ABCOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.landmark_proj = nn.Parameter(torch.empty(self.num_heads, self.num_landmarks, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "landmark_proj"):  # the base calls this before the slot projection exists
            nn.init.normal_(self.landmark_proj, std=self.head_dim**-0.5)

    def _slot_scores(self, k: Tensor, kpm: Optional[Tensor]) -> Tensor:
        """``a = k wᵀ`` ``(B, H, S, n)`` (contiguous), padded keys at ``-inf``: one product batched over ``B·H`` that
        reads ``k`` in place when it is a head view of time-first ``(S, B, H·d)`` projections (the base's layout)."""
        bsz, heads, length, d = k.shape
        a = torch.bmm(k.flatten(0, 1), _slot_matrix(self.landmark_proj, bsz, k.dtype)).view(bsz, heads, length, -1)
        if kpm is not None:
            a = a.masked_fill(kpm[:, None, :, None], float("-inf"))
        return a

    def _memory(self, k: Tensor, v: Tensor, kpm: Optional[Tensor]):
        """Key-side memory ``(K̃, Ṽ)`` ``(B, H, n, d)`` over every (unpadded) key, in ``k``'s dtype: the slot
        scores laid out ``(B, H, n, S)`` so the softmax over the keys runs along the last dimension; without padding
        one autograd node (:class:`_SlotMemory`)."""
        if kpm is None:
            return _SlotMemory.apply(k, v, self.landmark_proj)
        bsz, heads, length, d = k.shape
        keys, values = k.flatten(0, 1), v.flatten(0, 1)  # (B·H, S, d): views of time-first projections
        w = _slot_matrix(self.landmark_proj, bsz, k.dtype).transpose(1, 2)  # (B·H, n, d)
        scores = torch.bmm(w, keys.transpose(1, 2)).view(bsz, heads, -1, length)  # (B, H, n, S)
        alpha = softmax(scores.masked_fill(kpm[:, None, None, :], float("-inf")), dim=-1).to(k.dtype)  # all padded: 0
        alpha = alpha.flatten(0, 1)
        return torch.bmm(alpha, keys).view(bsz, heads, -1, d), torch.bmm(alpha, values).view(bsz, heads, -1, d)

    def _read(self, q: Tensor, mem_k: Tensor, mem_v: Tensor) -> Tensor:
        """``softmax(q K̃ᵀ / √d) Ṽ`` over the ``n`` slots (every slot exists: no empty rows): :class:`_SlotAttention`."""
        mask = None
        if self.training and self.dropout_p > 0:
            mask = q.new_empty(*q.shape[:-1], mem_k.shape[-2]).bernoulli_(1 - self.dropout_p).div_(1 - self.dropout_p)
        return _SlotAttention.apply(q, mem_k, mem_v, self.scaling, mask)

    # ----------------------------------------------------------------- causal
    def _new_state(self, q: Tensor) -> Dict[str, Tensor]:
        bsz, n, d = q.shape[0], self.num_landmarks, self.head_dim
        zeros = q.new_zeros(bsz, self.num_heads, n, d)
        return {
            "mem_k": zeros,  # Σ_j e^{a_jl - c} k_j at the running max c
            "mem_v": zeros,  # Σ_j e^{a_jl - c} v_j
            "mem_norm": zeros[..., 0],  # Σ_j e^{a_jl - c}
            "mem_max": q.new_full((bsz, self.num_heads, 1), float("-inf")),  # c: running max of the slot scores
        }

    @staticmethod
    def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
        """fp16 would overflow on ``1 / normaliser`` (above 65504): it runs the kernels in fp32."""
        return torch.float32 if dtype == torch.float16 else dtype

    def _causal(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kpm: Optional[Tensor],
        state: Optional[Dict[str, Tensor]],
        dtype: torch.dtype,
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tensor:
        """Causal ABC for queries that are the last ``T`` of the ``S`` new keys (``state`` holds the past and
        receives the new memory; ``None``: a fresh sequence whose memory is not kept).

        Three causal linear attentions (:func:`linear_attention`) with the slot weights
        ``e_j = exp(a_j - c_j)`` (``c_j``: running max of the scores so far, carried by the log decay
        ``c_{j-1} - c_j``, so query ``i`` sees ``exp(a_jl - c_i)``): the slot scores
        ``Σ_j (q_i·k_j) e_jl`` (features ``q, k``, values ``e``), the normalisers ``Σ_j e_jl`` (unit
        features), then, with ``r_i = softmax_l(scores / normaliser) / normaliser``, the output
        ``Σ_j (r_i·e_j) v_j`` (features ``r, e``).  Casts to ``dtype`` for the kernels.
        """
        tgt_len, src_len = q.shape[-2], k.shape[-2]
        blind = max(tgt_len - src_len, 0)  # queries before the first key see nothing
        if src_len == 0:
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        q = q[..., blind:, :]
        a = self._slot_scores(k, kpm)  # (B, H, S, n)
        run = torch.cummax(a.detach().amax(-1), dim=-1).values  # (B, H, S)
        if state is None and kpm is None:  # a fresh unpadded sequence: every score finite, nothing before
            safe, decay = run, F.pad(run[..., :-1] - run[..., 1:], (1, 0))
        else:
            past = run.new_full((*run.shape[:2], 1), float("-inf")) if state is None else state["mem_max"]  # (B,H,1)
            run = torch.maximum(run, past)
            safe = torch.where(torch.isfinite(run), run, torch.zeros_like(run))
            prev = torch.cat([past, run[..., :-1]], dim=-1)
            decay = torch.where(torch.isfinite(prev), prev - safe, torch.zeros_like(safe))  # nothing before: no decay
        e = torch.exp(a - safe.unsqueeze(-1)).to(dtype)

        def attend(
            qf: Tensor, kf: Tensor, vals: Tensor, mem: Optional[Tensor], out_dtype: Optional[torch.dtype] = None
        ) -> Tuple[Tensor, Optional[Tensor]]:
            """One causal linear attention from the memory ``mem`` and the new one; a fresh sequence (training,
            ``mem`` None) neither starts from nor returns a memory."""
            if mem is None:
                return linear_attention(
                    qf, kf, vals, causal=True, log_decay=decay, normalize=False, out_dtype=out_dtype
                ), None
            res, (new_mem, _) = linear_attention(
                qf,
                kf,
                vals,
                causal=True,
                log_decay=decay,
                normalize=False,
                initial_state=(mem, None),
                return_state=True,
                out_dtype=out_dtype,
            )
            return res, new_mem

        num, mem_k = attend(q.to(dtype), k.to(dtype), e, None if state is None else state["mem_k"].transpose(-1, -2))
        unit_q, unit_k = q.new_ones(*q.shape[:-1], 1, dtype=dtype), k.new_ones(*k.shape[:-1], 1, dtype=dtype)
        norm, mem_norm = attend(unit_q, unit_k, e, None if state is None else state["mem_norm"].unsqueeze(-2))
        empty = norm <= empty_norm(norm.dtype)  # also underflowed slots: 1 / norm must stay finite
        safe_norm = torch.where(empty, torch.ones_like(norm), norm)
        probs = softmax((num / safe_norm * self.scaling).masked_fill(empty, float("-inf")), dim=-1)
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, self.dropout_p, training=True)
        r = (probs / safe_norm).to(dtype)  # weight of each slot's unnormalised value sum
        out, mem_v = attend(r, e, v.to(dtype), None if state is None else state["mem_v"], out_dtype)
        if state is not None:
            assert mem_k is not None and mem_norm is not None and mem_v is not None  # each started from a memory
            state["mem_v"] = mem_v
            state["mem_k"], state["mem_norm"] = mem_k.transpose(-1, -2), mem_norm.squeeze(-2)
            state["mem_max"] = run[..., -1:]
        return torch.cat([out.new_zeros(*out.shape[:2], blind, out.shape[-1]), out], dim=-2) if blind else out

    def _causal_fresh(self, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype, out_dtype: Optional[torch.dtype]):
        """:meth:`_causal` for a fresh unpadded self-attention sequence (training): every score is finite and
        position ``i``'s running-max slot has a normaliser >= 1, so no slot needs the general path's guards.

        Two causal linear attentions (slot scores, output) instead of three: the slot weights, log decays and (CUDA)
        normalisers are one autograd node (:class:`_SlotWeights`: the normalisers from one ``logcumsumexp`` of the
        scores, exact in the log domain), and the slot softmax is one more (:class:`_SlotRead`); on CUDA each is one
        Triton kernel each way after the scores' product (:func:`_fused_slots`).  On CUDA ``q``,
        ``k``, ``v`` are read in place (the Triton kernels take the projections' head views); on the CPU they are
        copied once into contiguous ``dtype`` tensors (the C++ kernels' layout), which the backward then reads
        without copying them again."""
        if q.device.type in self.IN_PLACE_DEVICES:  # the Triton kernels read the projections' head views in place
            q, k, v = (x.to(dtype) for x in (q, k, v))
        else:  # the C++ kernels take contiguous rows: one copy each, which the backward reads too
            q, k, v = (_dense(x, dtype) for x in (q, k, v))
        scan = k.device.type in self.SCAN_DEVICES
        e, nl, k_read, decay = _SlotWeights.apply(k, self.landmark_proj, scan)
        decay = decay.detach()  # no gradient in eager already; torch.compile's trace of the node needs telling
        num = linear_attention(q, k_read, e, causal=True, log_decay=decay, normalize=False)
        if not scan:  # the CPU's logcumsumexp is a scalar loop (~50 ms at 4k): a linear attention with unit features
            unit = e.new_ones(*e.shape[:-1], 1)
            norm = linear_attention(unit, unit, e, causal=True, log_decay=decay, normalize=False)
            nl = -torch.log(norm.clamp_min(torch.finfo(norm.dtype).tiny))  # empty slots: above the bound, gradient 0
        mask = None
        if self.training and self.dropout_p > 0:
            mask = torch.empty_like(num).bernoulli_(1 - self.dropout_p).div_(1 - self.dropout_p)
        r = _SlotRead.apply(num, nl, self.scaling, mask, dtype, scan)
        return linear_attention(r, e, v, causal=True, log_decay=decay, normalize=False, out_dtype=out_dtype)

    SCAN_DEVICES = ("cuda",)  # device types whose normalisers come from logcumsumexp (tests add "cpu")
    IN_PLACE_DEVICES = ("cuda",)  # device types whose kernels read q, k, v in place (benchmarks/host_ops.py adds "cpu")

    def _step(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], state: Dict[str, Tensor]) -> Tensor:
        """:meth:`_causal` for one query and its key (``(B, H, 1, d)``, any float dtype): the recurrence of its
        three linear attentions, :func:`~efficient_attention.kernels.abc_step.abc_step` (one kernel launch on
        CUDA); the state's sums keep their accumulation dtype."""
        names = ("mem_k", "mem_v", "mem_norm", "mem_max")
        dropout = self.dropout_p if self.training else 0.0
        sums = (state["mem_k"], state["mem_v"], state["mem_norm"], state["mem_max"])
        out, new = abc_step(q, k, v, self.landmark_proj, sums, kpm, self.scaling, dropout)
        state.update(zip(names, new))
        return out

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        dtype = acc_dtype(q.dtype)
        device = q.device.type  # the products in autocast's dtype under autocast (as before), else in fp32
        product = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        if self.causal and masks.key_padding is None and q.shape[-2] == k.shape[-2] > 0:  # fresh: the kernels' dtype
            with torch.autocast(device, enabled=False):
                return self._causal_fresh(q, k, v, self._kernel_dtype(q.dtype), q.dtype), None
        if self.causal:  # the scores in autocast's dtype under autocast (as before), else in fp32; kernels cast
            with torch.autocast(device, enabled=False):
                out = self._causal(
                    q.to(product),
                    k.to(product),
                    v,
                    masks.key_padding,
                    None,
                    self._kernel_dtype(q.dtype),
                    out_dtype=q.dtype,
                )
            return out, None
        with torch.autocast(device, enabled=False):
            out = self._read(q.to(product), *self._memory(k.to(product), v.to(product), masks.key_padding))
        return out.to(q.dtype), None

    def _attend_step(
        self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state: Dict[str, Any], masks: AttentionMasks
    ) -> Tensor:
        """Causal: the slot sums ``mem_k``, ``mem_v`` ``(B, H, n, d)``, ``mem_norm (B, H, n)`` and the running max
        ``mem_max (B, H, 1)``.  Static keys: the key-side memory ``prev_key`` / ``prev_value`` = K̃ / Ṽ."""
        dtype = acc_dtype(q.dtype)
        if self.causal and q.shape[2] == 1 and k is not None and v is not None and k.shape[2] == 1 and "mem_k" in state:
            with torch.autocast(q.device.type, enabled=False):  # one token: a few kernels; the sums keep their dtype
                return self._step(q, k, v, masks.key_padding, state).to(q.dtype)
        q32 = q.to(dtype)
        if not self.causal:

            def summarise(k: Tensor, v: Tensor, kpm: Optional[Tensor]) -> Dict[str, Any]:
                return dict(zip(("prev_key", "prev_value"), self._memory(k.to(dtype), v.to(dtype), kpm)))

            self._static_kv(state, k, v, masks.key_padding, summarise)
            return self._read(q32, state["prev_key"], state["prev_value"]).to(q.dtype)
        assert k is not None and v is not None  # causal decoding always brings the new queries' own keys
        tgt_len = q.shape[2]
        if "mem_k" in state and k.shape[2] < tgt_len:
            raise ValueError(f"ABC decoding needs at least as many new keys ({k.shape[2]}) as new queries ({tgt_len})")
        names = ("mem_k", "mem_v", "mem_norm", "mem_max")
        sums = {n: state[n] for n in names} if "mem_k" in state else self._new_state(q32)
        out = self._causal(q32, k.to(dtype), v.to(dtype), masks.key_padding, sums, self._kernel_dtype(q.dtype))
        state.update(sums)
        return out.to(q.dtype)
