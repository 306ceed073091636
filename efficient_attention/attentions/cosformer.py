"""cosFormer (Qin et al., 2022): linear attention with a cos-based re-weighting.

``s_ij = act(q_i)·act(k_j) cos(π (i - j) / 2M)``, ``out_i = Σ_j s_ij v_j / Σ_j s_ij``; the cosine
splits as ``cos·cos + sin·sin``, so it is linear attention on ``2d`` features.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import Capabilities, Pattern
from ..functional import acc_dtype, dense_strides, heads_bmm, linear_attention_step, op_into
from ..kernels.backends import TRITON_DTYPES, triton_interpreted, triton_reason
from ..kernels.linear_attention import (
    LINEAR_ATTENTION,
    LINEAR_MAX_FEATURES,
    LINEAR_MIN_FEATURES,
    LinearCpp,
    LinearTriton,
    _Divide,
    cpp_chunk,
    linear_attention,
)
from ..kernels.linear_attention import _split_k as _state_chunks  # chunks for a (m, L) @ (L, w) reduction
from ..options import AttentionOptions, choice, positive_int
from ..registry import register_attention

__all__ = ["CosformerAttention", "cosFormer"]

logger = logging.getLogger(__name__)

_ACTIVATIONS = ("relu", "elu")


@dataclass(frozen=True)
class CosformerOptions(AttentionOptions):
    act_fun: str = choice("relu", _ACTIVATIONS, "feature map: 'relu' or 'elu' (1 + elu)")
    max_len: Optional[int] = positive_int(
        None, "M of the cos re-weighting (None: the longer input length of each call; needed for causal decoding)"
    )


_TABLES: dict = {}


def _cos_sin(length: int, m_len: int, device, dtype: torch.dtype, grad_dtype: torch.dtype) -> Tuple[Tensor, ...]:
    """``table`` ``(L, 2, 1)`` ``[cos θ_i, sin θ_i]`` in ``dtype`` and its columns ``cos, sin`` ``(L, 1)`` in
    ``grad_dtype`` (for the backward), ``θ_i = π i / 2M``; cached by the arguments (and whether inference mode is
    on: its tensors cannot be saved for a backward) outside compilation: an unpadded batch has the same tables every
    step, and a decoding step reads its angle's row (no op per call)."""
    cache = not torch.compiler.is_compiling()
    key = (length, m_len, device, dtype, grad_dtype, cache and torch.is_inference_mode_enabled())
    tables = _TABLES.get(key) if cache else None
    if tables is None:
        theta = (math.pi / 2) * torch.arange(length, device=device, dtype=dtype) / float(m_len)
        table = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1).unsqueeze(-1)
        columns = table.to(grad_dtype)
        tables = (table, columns[:, 0], columns[:, 1])
        if cache:
            if len(_TABLES) >= 64:
                _TABLES.clear()
            _TABLES[key] = tables
    return tables


def _triton_features_ok(x: Tensor, table: Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`_features` is one Triton kernel (``kernels/_triton_cosformer.py``): on CUDA (CPU tensors
    under Triton's interpreter), fp16 / bf16 / fp32 in and out, an fp32 table, ``x``'s last stride 1, ``d <= 256``,
    not under ``torch.compile`` (Inductor fuses the ATen ops itself)."""
    return (
        (x.device.type == "cuda" or triton_interpreted())
        and x.dtype in TRITON_DTYPES
        and dtype in TRITON_DTYPES
        and table.dtype == torch.float32
        and table.is_contiguous()
        and x.stride(-1) == 1
        and x.shape[-1] <= 256
        and not torch.compiler.is_compiling()
        and triton_reason() is None
    )


def _features(x: Tensor, table: Tensor, act_fun: str, dtype: torch.dtype, flat: bool = False) -> Tensor:
    """``[φ(x) cos θ, φ(x) sin θ]`` ``(B, H, L, 2d)`` (``flat``: ``(B*H, L, 2d)``) contiguous in ``dtype`` from
    ``x (B, H, L, d)`` and ``table`` ``(L, 2, 1)`` of :func:`_cos_sin`, the product in the table's dtype: one
    Triton kernel where :func:`_triton_features_ok`, else two ATen kernels (the activation, one broadcast product
    written in ``dtype``; on CUDA the second is TensorIterator's generic loop, 5x slower than the Triton kernel)."""
    bsz, heads, length, dim = x.shape
    if _triton_features_ok(x, table, dtype):
        from ..kernels._triton_cosformer import cos_features

        out = cos_features(x, table.view(length, 2), 1 + _ACTIVATIONS.index(act_fun), dtype)
    else:
        act = F.relu(x) if act_fun == "relu" else 1.0 + F.elu(x.to(acc_dtype(dtype)))
        out = torch.empty(bsz, heads, length, 2, dim, dtype=dtype, device=x.device)
        torch.mul(act.unsqueeze(-2), table, out=out)
    return out.view(bsz * heads, length, 2 * dim) if flat else out.view(bsz, heads, length, 2 * dim)


def _features_backward(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, act_fun: str) -> Tensor:
    """The gradient of :func:`_features` at ``x (B, H, L, d)`` for ``grad`` (``(B, H, L, 2d)`` or flat): the cos
    half times ``cos`` plus the sin half times ``sin`` (``(L, 1)`` in ``grad``'s dtype; two kernels, fp32
    inside), then the activation's."""
    if grad.dim() != x.dim():
        grad = grad.view(x.shape[:-1] + (2 * x.shape[-1],))
    grad_cos, grad_sin = grad.chunk(2, dim=-1)  # one op for the two halves
    return _activation_backward(torch.mul(grad_cos, cos).addcmul_(grad_sin, sin), x, act_fun, in_place=False)


def _product_features_backward(a: Tensor, b: Tensor, x: Tensor, cos: Tensor, sin: Tensor, act_fun: str) -> Tensor:
    """:func:`_features_backward` of the product ``a @ b`` (``a (N, L, w)``, ``b (N, w, 2d)``, ``N = B·H``)
    without making it: its cos half, scaled in place, then its sin half added and freed, then the activation's
    gradient in place (at most two ``(N, L, d)`` tensors alive, not a ``(N, L, 2d)`` product beside two more:
    that was the peak of noncausal cosFormer's training step), in ``x``'s layout (a head view of the time-first
    projections gets a time-first gradient: autograd's permute back to them is a view, not a copy)."""
    d = x.shape[-1]
    g = heads_bmm(a, b[..., :d], x.shape, dense_strides(x)).mul_(cos)
    g.addcmul_(torch.bmm(a, b[..., d:]).view(x.shape), sin)
    return _activation_backward(g, x, act_fun, in_place=g.dtype == x.dtype)


def _activation_backward(grad_act: Tensor, x: Tensor, act_fun: str, in_place: bool) -> Tensor:
    """The gradient at ``x`` of the activation (relu or 1 + elu) for ``grad_act``, in ``x``'s dtype; written over
    ``grad_act`` when ``in_place`` (same dtype)."""
    if act_fun == "relu":  # relu's own backward: one kernel, the gradient where x > 0
        if in_place:
            return torch.ops.aten.threshold_backward.grad_input(grad_act, x, 0, grad_input=grad_act)
        return torch.ops.aten.threshold_backward(grad_act.to(x.dtype), x, 0)
    # d(1 + elu)/dx = 1 for x > 0, e^x otherwise
    return torch.where(x > 0, grad_act, grad_act * torch.exp(x.to(grad_act.dtype))).to(x.dtype)


class _Features(torch.autograd.Function):
    """:func:`_features` of the query and of the key as one autograd node (three kernels each backward); nothing
    but ``q``, ``k`` and the tables' columns saved.  ``tables`` are the query's and the key's ``(table, cos, sin)``
    of :func:`_cos_sin`."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, tables, act_fun: str, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        (tq, cq, sq), (tk, ck, sk) = tables
        ctx.save_for_backward(q, k, cq, sq, ck, sk)
        ctx.act_fun = act_fun
        return _features(q, tq, act_fun, dtype), _features(k, tk, act_fun, dtype)

    @staticmethod
    def backward(ctx, grad_qf: Tensor, grad_kf: Tensor):
        q, k, cq, sq, ck, sk = ctx.saved_tensors
        grad_q = _features_backward(grad_qf, q, cq, sq, ctx.act_fun)
        grad_k = _features_backward(grad_kf, k, ck, sk, ctx.act_fun)
        return grad_q, grad_k, None, None, None


def _reduce_length(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ @ b`` ``(N, m, w)`` for contiguous ``a (N, L, m)``, ``b (N, L, w)``, the length cut by
    :func:`_state_chunks`; the chunk products are summed in fp32 and rounded once to ``a``'s dtype."""
    n = _state_chunks(a.shape[1], a)
    if n == 1:
        return torch.bmm(a.transpose(1, 2), b)
    batch, length, m = a.shape
    chunk = length // n
    parts = torch.bmm(a.view(batch * n, chunk, m).transpose(1, 2), b.view(batch * n, chunk, b.shape[-1]))
    return parts.view(batch, n, m, b.shape[-1]).sum(1, dtype=a.dtype)


class _Noncausal(torch.autograd.Function):
    """Noncausal cosFormer from ``q (B, H, T, d)``, ``k (B, H, S, d)``, ``v (B, H, S, d)``: the features
    ``q̂, k̂`` (:func:`_features`, ``(B, H, ·, 2d)`` in ``dtype``), then ``out_t = q̂_t S / q̂_t z`` with
    ``S = Σ_j k̂_j v_jᵀ``, ``z = Σ_j k̂_j``: every product in ``dtype`` (bf16 under autocast runs on tensor cores,
    accumulating in fp32), the output (in ``dtype``) written in a time-first ``(T, B, H, d)`` memory layout
    (merging the heads needs no copy).  ``tables`` are the query's and the key's ``(table, cos, sin)`` of
    :func:`_cos_sin`.

    ``v`` gets columns of ones up to a multiple of 8 columns (the normaliser's, and aligned rows for the
    products), so ``S`` and ``z`` are one ``(2d, w)`` state and numerator and denominator one product; rows with
    a denominator <= 0 (nothing attended) give 0 with zero gradients.  One autograd node: two batched products
    forward, four backward (the reductions over the length cut into chunks on CUDA); the features are recomputed
    in the backward (two kernels each) rather than saved (twice the size of ``q`` and ``k`` each), and at most
    one of them is alive at a time, forward and backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, tables, act_fun: str, dtype: torch.dtype) -> Tensor:
        bsz, heads, tgt_len, dim = q.shape
        width = -(-(dim + 1) // 8) * 8
        (tq, cq, sq), (tk, ck, sk) = tables
        v1 = F.pad(v.to(dtype), (0, width - dim), value=1.0).view(bsz * heads, -1, width)  # [v, 1, ...]
        state = _reduce_length(_features(k, tk, act_fun, dtype, flat=True), v1)  # (B*H, 2d, w): [S, z, ...]
        o = torch.bmm(_features(q, tq, act_fun, dtype, flat=True), state).view(bsz, heads, tgt_len, width)
        den = o[..., dim : dim + 1]  # (B, H, T, 1)
        den = den.masked_fill(den <= 0, float("inf"))  # nothing attended: num / inf = 0
        out = op_into(torch.div, q.shape, (heads * dim, dim, bsz * heads * dim, 1), o[..., :dim], den)
        ctx.save_for_backward(q, k, v1, state, den, out, tq, cq, sq, tk, ck, sk)
        ctx.act_fun, ctx.dtype, ctx.v_dtype = act_fun, dtype, v.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v1, state, den, out, tq, cq, sq, tk, ck, sk = ctx.saved_tensors
        bsz, heads, tgt_len, dim = out.shape
        src_len, width = k.shape[2], v1.shape[-1]
        grad_num = torch.div(grad, den).to(ctx.dtype)  # a cast only for an output of another dtype
        grad_o = F.pad(grad_num, (0, width - dim))  # [d num, d den, 0...] contiguous
        grad_o[..., dim : dim + 1].sub_((grad_num * out).sum(-1, keepdim=True))  # d(num/den)/d den = -out / den
        del grad_num
        grad_o = grad_o.view(bsz * heads, tgt_len, width)
        # the query's side first: its features and gradients are freed before the key's are made
        grad_state = _reduce_length(_features(q, tq, ctx.act_fun, ctx.dtype, flat=True), grad_o)
        grad_q = _product_features_backward(grad_o, state.transpose(1, 2), q, cq, sq, ctx.act_fun)
        del grad_o
        kf = _features(k, tk, ctx.act_fun, ctx.dtype, flat=True)
        # grad_v written time-first: splitting the heads back (to (S, B, H*d)) needs no copy
        grad_v = op_into(torch.bmm, (bsz * heads, src_len, dim), (dim, bsz * heads * dim, 1), kf, grad_state[..., :dim])
        del kf
        grad_k = _product_features_backward(v1, grad_state.transpose(1, 2), k, ck, sk, ctx.act_fun)
        return grad_q, grad_k, grad_v.view(bsz, heads, src_len, dim).to(ctx.v_dtype), None, None, None


class _CausalCpp(torch.autograd.Function):
    """Causal cosFormer on the C++ linear-attention kernel with the features made inside it, chunk by chunk (no
    ``(B, H, L, 2d)`` feature tensor or gradient is ever allocated): ``q, k, v (B, H, L, d)`` contiguous fp32 /
    fp64, ``cos_sin (L, 2)``, ``act`` 0 (relu) or 1 (1 + elu); ``(num (B, H, L, d), den (B, H, L))``.  Saves the
    inputs and the kernel's entering states."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cos_sin: Tensor, act: int, chunk: int):
        num, den, states, _, _ = torch.ops.efficient_attention.linear_causal_fwd(
            q, k, v, None, None, None, True, chunk, cos_sin, act
        )
        ctx.save_for_backward(q, k, v, cos_sin, states)
        ctx.act, ctx.chunk = act, chunk
        return num, den

    @staticmethod
    def backward(ctx, grad_num: Tensor, grad_den: Tensor):
        q, k, v, cos_sin, states = ctx.saved_tensors
        dq, dk, dv, _, _ = torch.ops.efficient_attention.linear_causal_bwd(
            grad_num, grad_den, None, None, q, k, v, None, states, True, ctx.chunk, cos_sin, ctx.act
        )
        return dq, dk, dv, None, None, None


def _causal_cpp(q: Tensor, k: Tensor, v: Tensor, table: Tensor, act_fun: str, dtype: torch.dtype) -> Tensor:
    """:class:`_CausalCpp`, normalised (``linear_attention``'s division: rows that attended nothing give 0) and
    written in ``dtype``; ``table`` ``(L, 2, 1)`` of :func:`_cos_sin`."""
    acc = acc_dtype(dtype)
    q, k, v = (x.to(acc).contiguous() for x in (q, k, v))
    cos_sin = table.to(acc).view(-1, 2)
    num, den = _CausalCpp.apply(q, k, v, cos_sin, _ACTIVATIONS.index(act_fun), cpp_chunk(2 * q.shape[-1]))
    return _Divide.apply(num, den, dtype)


def _causal_triton(q: Tensor, k: Tensor, v: Tensor, table: Tensor, act_fun: str, dtype: torch.dtype) -> Tensor:
    """Causal cosFormer on the Triton linear-attention kernels with the features made inside them, chunk by chunk
    (no ``(B, H, L, 2d)`` feature tensor or gradient): ``q, k, v (B, H, L, d)`` read in place (time-first head
    views of the projections too), the result in ``dtype``, time-first; ``table`` ``(L, 2, 1)`` fp32 of
    :func:`_cos_sin`."""
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    cos_sin = table.view(-1, 2)
    act = _ACTIVATIONS.index(act_fun)
    out, _, _ = LinearTriton.run_fused(q, k, v, None, None, None, True, dtype, True, cos_sin, act)
    return out


def _fused_triton_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`_causal_triton` takes these raw rows: ``2d`` features within the kernels' range and one
    dtype.  (Session 8 kept fp16 / bf16 to head dim 64 after wrong results at 32 and 16 on an H200; those came
    from one tile shape, which ``linear_attention._config`` no longer uses with ``FEAT``:
    ``benchmarks/cosformer_fused_check_gpu.py`` checks every head dim 16-128 against float64.)"""
    return LINEAR_MIN_FEATURES <= 2 * q.shape[-1] <= LINEAR_MAX_FEATURES and q.dtype == k.dtype


@register_attention("cosformer", "cos_former")
class CosformerAttention(EfficientAttention):
    """cosFormer linear attention.

    Math: ``s_ij = φ(q_i)·φ(k_j) cos(π (p_i - p_j) / 2M)`` with ``φ = relu`` or
    ``1 + elu``, ``out_i = Σ_j s_ij v_j / Σ_j s_ij`` (0 when nothing is attended);
    ``p`` are positions (0-based; causal queries are the last ``T`` of ``S``).

    ``M``: ``max_len`` when set, else the longer of the real (unpadded) query
    and key lengths of each batch item (the paper's choice), with positions
    counting real tokens only, so padding never changes the output; positions
    must stay below ``M``.
    Incremental decoding cannot know the final length, so it needs a fixed
    ``M``: causal decoding requires ``max_len`` (``ValueError`` otherwise), and
    ``static_kv`` cross decoding uses ``max_len`` or, if unset, ``M`` = the
    number of real keys (equal to the paper's ``M`` whenever ``T`` is not
    longer; a query past that position then raises).  The fairseq and ParaGen
    plugins pass their maximum positions as ``max_len``.  With the same ``M``,
    decoding equals the full forward exactly.

    Shapes: q ``(B, H, T, d)``, k/v ``(B, H, S, d)``.  Patterns: noncausal
    self, causal self (:func:`~efficient_attention.kernels.linear_attention.linear_attention`'s
    chunked kernels; without padding, the C++ kernel on the CPU and the Triton kernels on CUDA make the features
    inside them, chunk by chunk; constant-state decoding),
    noncausal cross (``static_kv`` caches ``Σ φ̂(k) vᵀ``).  ``key_padding_mask``
    honoured; an arbitrary ``attn_mask`` is not; no attention dropout (the
    paper has none).  Half inputs: features computed in fp32 and written in the
    input dtype; the causal kernels and the noncausal products (bf16: tensor
    cores) accumulate in fp32; fp16 noncausal runs its products in fp32 (a
    state summed over the length could overflow fp16).

    Cost: O((T + S)·d²) time, O((T + S)·d + d²) memory per head.
    """

    capabilities = Capabilities(
        patterns=frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS}),
        incremental=True,
        constant_state=True,
        backends=("kernels.linear_attention", "triton", "torch"),
    )
    Options = CosformerOptions
    fused_projections = False  # its backward keeps only some of q, k, v (tests/test_projections.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.dropout_p > 0:
            logger.info("cosFormer applies no attention dropout (dropout=%s is unused)", self.dropout_p)

    # --------------------------------------------------------------- features
    def _features(self, x: Tensor, pos: Tensor, m_len: Tensor, kpm: Optional[Tensor] = None) -> Tensor:
        """``[φ(x) cos θ, φ(x) sin θ]`` ``(B, H, L, 2d)``, ``θ = π pos / 2M``; ``pos`` ``(B or 1, L)``, ``m_len``
        ``(B or 1, 1)`` (both float)."""
        x = self._act(x, kpm)
        theta = ((math.pi / 2) * pos.to(x.dtype) / m_len.to(x.dtype))[:, None, :, None]  # (B, 1, L, 1)
        return torch.cat([x * torch.cos(theta), x * torch.sin(theta)], dim=-1)

    def _act(self, x: Tensor, kpm: Optional[Tensor]) -> Tensor:
        """``φ(x)`` in the accumulation dtype, padded positions zero."""
        x = x.to(acc_dtype(x.dtype))
        if self.act_fun != "relu" and torch.compiler.is_compiling():
            # (torch 2.13: the fake elu_backward lays its gradient out as the saved input, the CPU kernel as the
            # incoming gradient; for a time-first head view they differ and the compiled backward's view fails)
            x = x.contiguous()
        x = F.relu(x) if self.act_fun == "relu" else 1.0 + F.elu(x)
        return x if kpm is None else x.masked_fill(kpm[:, None, :, None], 0.0)

    def _check_len(self, needed: int, m_len: int) -> None:
        if needed > m_len:
            raise ValueError(
                f"cosFormer positions reach {needed} but M = {m_len}: the cos re-weighting needs every position "
                f"below M (set max_len >= {needed})"
            )

    def _positions(self, tgt_len: int, src_len: int, kpm: Optional[Tensor], device) -> Tuple[Tensor, Tensor, Tensor]:
        """``(query positions, key positions, M)`` of a full call.

        With ``max_len``: positions are the indices and ``M = max_len``.  Without: positions count the real
        (unpadded) keys only and ``M`` is the longer of the real query and key lengths of each batch item,
        so padding never changes the output.
        """
        if self.max_len is not None:
            self._check_len(max(tgt_len, src_len), self.max_len)
            m_len = torch.full((1, 1), float(self.max_len), device=device)
            return (torch.arange(tgt_len, device=device)[None], torch.arange(src_len, device=device)[None], m_len)
        if kpm is None:
            m_len = torch.full((1, 1), float(max(tgt_len, src_len, 1)), device=device)
            return (torch.arange(tgt_len, device=device)[None], torch.arange(src_len, device=device)[None], m_len)
        valid = ~kpm
        k_pos = (valid.long().cumsum(-1) - 1).clamp_min(0)  # rank among the real keys
        count = valid.sum(-1, keepdim=True)  # (B, 1)
        if self.cross:  # queries are a separate, unpadded sequence
            return (torch.arange(tgt_len, device=device)[None], k_pos, count.clamp_min(tgt_len).clamp_min(1))
        # self attention: the queries are the same tokens (causal: the last T of them)
        return k_pos[:, src_len - tgt_len :], k_pos, count.clamp_min(1)

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        tgt_len, src_len = q.shape[2], k.shape[2]
        kpm = masks.key_padding
        if kpm is None:  # positions are the indices: features from one cached table, every dtype explicit
            return self._attend_unpadded(q, k, v), None
        q_pos, k_pos, m_len = self._positions(tgt_len, src_len, kpm, q.device)
        qf = self._features(q, q_pos, m_len).to(q.dtype)
        kf = self._features(k, k_pos, m_len, kpm).to(q.dtype)
        return linear_attention(qf, kf, v, causal=self.causal).to(q.dtype), None

    def _attend_unpadded(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        tgt_len, src_len, dtype = q.shape[2], k.shape[2], q.dtype
        m_len = self.max_len if self.max_len is not None else max(tgt_len, src_len, 1)
        if self.max_len is not None:
            self._check_len(max(tgt_len, src_len), self.max_len)
        acc = acc_dtype(dtype)
        # fp16 noncausal sums run in fp32 (a state summed over the length could overflow fp16); else the features
        # and every product are in the input dtype, accumulating in fp32 (bf16: the GPU's tensor cores)
        own_products = not self.causal and dtype != torch.float16
        feature_dtype = dtype if self.causal or own_products else acc
        with torch.autocast(q.device.type, enabled=False):
            q_tables = _cos_sin(tgt_len, m_len, q.device, acc, feature_dtype)
            k_tables = q_tables if src_len == tgt_len else _cos_sin(src_len, m_len, q.device, acc, feature_dtype)
            if own_products:
                return _Noncausal.apply(q, k, v, (q_tables, k_tables), self.act_fun, dtype)
            if self.causal and tgt_len == src_len:  # the features made in the kernels (C++ or Triton)
                impl = LINEAR_ATTENTION.select(None, q, k, v)
                if impl is LinearCpp:
                    return _causal_cpp(q, k, v, q_tables[0], self.act_fun, dtype)
                if impl is LinearTriton and _fused_triton_ok(q, k, v):
                    return _causal_triton(q, k, v, q_tables[0].to(torch.float32), self.act_fun, dtype)
            qf, kf = _Features.apply(q, k, (q_tables, k_tables), self.act_fun, feature_dtype)
            return linear_attention(qf, kf, v, causal=self.causal, out_dtype=dtype)

    def _static_summary(self, k: Tensor, v: Tensor, kpm: Optional[Tensor]) -> Dict[str, Any]:
        """Static keys summarised once: ``prev_key = Σ φ̂(k) vᵀ``, ``prev_value = Σ φ̂(k)``, ``m_len (B,)`` the
        M of every row and ``m_min`` (int) the smallest (checked against the query positions without a sync)."""
        bsz, src_len, device = k.shape[0], k.shape[2], k.device
        if self.max_len is not None:
            self._check_len(src_len, self.max_len)
            k_pos = torch.arange(src_len, device=device)[None]
            m_len = torch.full((bsz,), self.max_len, dtype=torch.long, device=device)
            m_min = self.max_len
        else:  # M = the number of real keys (the full pass's M whenever T <= that)
            valid = torch.ones(bsz, src_len, dtype=torch.bool, device=device) if kpm is None else ~kpm
            k_pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
            m_len = valid.sum(-1).clamp_min(1)
            m_min = max(src_len, 1) if kpm is None else int(m_len.min())  # once per source, not per step
        kf = self._features(k, k_pos, m_len[:, None], kpm).to(k.dtype)
        _, (kv, ks) = linear_attention(kf[..., :0, :], kf, v, causal=False, return_state=True)
        return {"prev_key": kv, "prev_value": ks, "m_len": m_len, "m_min": m_min}

    def _attend_step(
        self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state: Dict[str, Any], masks: AttentionMasks
    ) -> Tensor:
        """Causal: the running sums ``kv_sum (B, H, 2d, d)``, ``k_sum (B, H, 2d)``; static keys: see
        :meth:`_static_summary`.  Query positions are ``masks.query_offset`` on."""
        tgt_len, start = q.shape[2], masks.query_offset
        if not self.causal:
            self._static_kv(state, k, v, masks.key_padding, self._static_summary)
            self._check_len(start + tgt_len, state["m_min"])
            q_pos = torch.arange(start, start + tgt_len, device=q.device)[None]
            qf = self._features(q, q_pos, state["m_len"][:, None])
            kv, ks = state["prev_key"], state["prev_value"]
            no_keys, no_values = qf[..., :0, :], kv.new_empty(*kv.shape[:2], 0, kv.shape[-1]).to(qf.dtype)
            return linear_attention(qf, no_keys, no_values, causal=False, initial_state=(kv, ks)).to(q.dtype)
        if self.max_len is None:
            raise ValueError(
                "causal cosFormer decoding needs a fixed M for the cos re-weighting: build it with max_len "
                "(the longest sequence you will decode)"
            )
        assert k is not None and v is not None  # causal decoding always brings the new queries' own keys
        src_len = k.shape[2]
        if src_len != tgt_len:
            raise ValueError(
                f"causal cosFormer decoding needs as many new keys as queries, got {src_len} and {tgt_len}"
            )
        self._check_len(start + src_len, self.max_len)
        if tgt_len == 1 and "kv_sum" in state:  # one token: [cos, sin] of its angle from the cached table
            acc = acc_dtype(q.dtype)
            angle = _cos_sin(self.max_len, self.max_len, q.device, acc, acc)[0][start]  # (2, 1)
            x = torch.stack([q, k], dim=2)  # the query and its key as one (B, H, 2, 1, d): fewer ops
            if self.act_fun == "relu":  # relu(x) c = relu(x c) for c = cos, sin >= 0: product (in acc), relu in place
                feats = torch.mul(x, angle).relu_()
            else:
                feats = (1.0 + F.elu(x.to(acc))) * angle
            qf, kf = feats.flatten(-2).split(1, dim=2)  # (B, H, 1, 2d) each: [φ cos θ, φ sin θ]
            if masks.key_padding is not None:
                kf = kf.masked_fill(masks.key_padding[:, None, :, None], 0.0)
            out, state["kv_sum"], state["k_sum"] = linear_attention_step(qf, kf, v, state["kv_sum"], state["k_sum"])
            return out.to(q.dtype)
        pos = torch.arange(start, start + src_len, device=q.device)[None]
        m_len = torch.full((1, 1), float(self.max_len), device=q.device)
        qf = self._features(q, pos, m_len).to(q.dtype)
        kf = self._features(k, pos, m_len, masks.key_padding).to(q.dtype)
        init = (state["kv_sum"], state["k_sum"]) if "kv_sum" in state else None
        out, (state["kv_sum"], state["k_sum"]) = linear_attention(
            qf, kf, v, causal=True, initial_state=init, return_state=True
        )
        return out.to(q.dtype)


cosFormer = CosformerAttention
