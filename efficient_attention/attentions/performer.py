"""Performer (Choromanski et al., 2020): softmax attention through positive random features (FAVOR+).

``exp(q·k/√d) ≈ φ(q)·φ(k)`` with ``φ(x) = exp(W x' - |x'|²/2)``, ``x' = x d^(-1/4)``
and ``m`` orthogonal Gaussian rows ``W``; ``out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import acc_dtype, dense_strides, heads_bmm, may_keep_derived, op_new, softmax
from ..kernels.linear_attention import _split_k, linear_attention
from ..options import AttentionOptions, nonnegative_int, option, positive_int
from ..registry import register_attention

__all__ = ["Performer"]

logger = logging.getLogger(__name__)
_TRITON_STEP: Dict[str, str] = {}  # "failed": why the Triton decoding step could not run (then never tried again)


def gaussian_orthogonal_features(num_rows: int, dim: int, orthogonal: bool, device=None) -> Tensor:
    """``(num_rows, dim)`` Gaussian projection; rows orthogonal within each block of ``dim``.

    Orthogonal rows (QR of a Gaussian matrix with the signs of ``diag(R)``
    fixed, so the directions are uniform) are rescaled to the norms of
    independent Gaussian vectors (chi-distributed), so each row is still
    marginally ``N(0, I)``.
    """
    gauss = torch.randn(num_rows, dim, device=device)
    if not orthogonal:
        return gauss
    num_blocks = -(-num_rows // dim)
    q, r = torch.linalg.qr(torch.randn(num_blocks, dim, dim, device=device))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # sign fix: Haar (unbiased) directions
    rows = q.transpose(-1, -2).reshape(num_blocks * dim, dim)[:num_rows]  # orthonormal within each block
    return rows * gauss.norm(dim=1, keepdim=True)


@dataclass(frozen=True)
class PerformerOptions(AttentionOptions):
    approx_attn_dim: int = positive_int(16, "number of random features m")
    orthogonal_features: bool = option(True, "draw the random features in orthogonal blocks (else i.i.d. Gaussian)")
    feature_redraw_interval: int = nonnegative_int(
        1000, "redraw the random features every this many training forwards (0: never)"
    )


def _time_first_matmul(x: Tensor, w_t: Tensor) -> Tensor:
    """``x @ w_t`` for ``x (B, H, L, d)``; a view of a time-first ``(L, B, H, d)`` tensor (the projections'
    layout) is multiplied as that tensor, without the copy ``matmul`` would make, and keeps its layout.  Rows
    ``(L, B*H, d)`` are multiplied as they are."""
    if x.dim() == 3:
        return torch.matmul(x, w_t)
    tf = x.permute(2, 0, 1, 3)
    if tf.is_contiguous():
        return torch.matmul(tf, w_t).permute(1, 2, 0, 3)
    return torch.matmul(x, w_t)


def _log_decay(run: Tensor) -> Tensor:
    """``c_{j-1} - c_j`` of the running max ``run (B, H, S)`` with 0 first: the first entry repeated in front
    (one kernel), then one subtraction."""
    return F.pad(run, (1, 0), mode="replicate")[..., :-1] - run


def _key_logits(k: Tensor, w_t: Tensor, half_sq: float) -> Tensor:
    """``W' k - s²|k|²/2`` ``(B, H, S, m)`` in the accumulation dtype: product, norm, ``addcmul``."""
    norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=acc_dtype(k.dtype))
    return torch.addcmul(_time_first_matmul(k, w_t), norm, norm, value=-half_sq)


def _time_first_view(x: Tensor) -> Tensor:
    """``(L, B, H, n)`` view of ``x (B, H, L, n)``; rows ``(L, B*H, n)`` as they are (the permutation is its own
    inverse's pair: :func:`_heads_view` undoes it)."""
    return x.permute(2, 0, 1, 3) if x.dim() == 4 else x


def _heads_view(x: Tensor) -> Tensor:
    """``(B, H, L, n)`` view of time-first ``x (L, B, H, n)``; rows as they are."""
    return x.permute(1, 2, 0, 3) if x.dim() == 4 else x


def _feature_grad_rows(grad: Tensor, feats: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad ∘ feats`` in ``dtype``, written time-first and contiguous: ``(L, B, H, m)`` for ``(B, H, L, m)``
    features, ``(L, B*H, m)`` for rows."""
    tf = _time_first_view(feats)
    return op_new(torch.mul, tf.shape, dtype, _time_first_view(grad), tf)


def _query_grad(grad: Tensor, feats: Tensor, w: Tensor) -> Tensor:
    """``∂q`` (``w``'s dtype, time-first memory) for ``feats = softmax_m(q W')`` (``(B, H, T, m)`` or rows
    ``(T, B*H, m)``; ``w = W' (m, d)``) from their gradient: ``(g∘φ) W'``.  The softmax's normalisation has no
    gradient here: the attention output is unchanged by a positive factor per query on its features
    (``num / den``), so ``Σ_m φ_m g_m = 0``."""
    return _heads_view(torch.matmul(_feature_grad_rows(grad, feats, w.dtype), w))


KEY_GRAD_SLICE = 1 << 22  # elements of the fp32 product per slice in _key_grad (16 MiB)


def _key_grad(grad: Tensor, feats: Tensor, k: Tensor, w_acc: Tensor, half_sq: float) -> Tensor:
    """``∂k`` (``k``'s dtype, time-first memory) for ``feats = exp(k W' - s²|k|²/2 - c)`` (``(B, H, S, m)`` or
    rows; ``w_acc = W' (m, d)``; ``c`` carries no gradient) from their gradient: ``∂k = (g∘φ) W' - s² k Σ_m
    (g∘φ)``, in ``w_acc``'s (the accumulation) dtype and written in ``k``'s.  For a half ``k`` the fp32 product
    is made :data:`KEY_GRAD_SLICE` elements of positions at a time, each slice written (cast) into the result: the
    whole fp32 product, twice the size of ``k``, was the peak of noncausal Performer's training step."""
    gl = _feature_grad_rows(grad, feats, w_acc.dtype)
    kt, sums, scale = _time_first_view(k), gl.sum(-1, keepdim=True), -2.0 * half_sq
    if w_acc.dtype == k.dtype:
        return _heads_view(torch.matmul(gl, w_acc).addcmul_(kt, sums, value=scale))
    out = torch.empty(kt.shape, dtype=k.dtype, device=k.device)
    step = max(1, KEY_GRAD_SLICE // max(1, kt[0].numel()))  # positions per slice (dim 0 is the length)
    for a in range(0, kt.shape[0], step):
        b = min(kt.shape[0], a + step)
        torch.addcmul(torch.matmul(gl[a:b], w_acc), kt[a:b], sums[a:b], value=scale, out=out[a:b])
    return _heads_view(out)


class _CausalFeatures(torch.autograd.Function):
    """Causal Performer features of unpadded queries and keys as one autograd node: ``φ(q) (B, H, T, m)``,
    ``φ(k) (B, H, S, m)`` contiguous in ``dtype`` and the log decay ``(B, H, S)``.

    ``φ(q) = softmax_m(W' q)`` (up to a factor per query, which cancels); ``φ_j = exp(W' k_j - s²|k_j|²/2 - c_j)``
    with ``c`` the running max over the keys so far (log decay ``c_{j-1} - c_j``, no gradient); ``W' = s W``,
    ``s = d^(-1/4)``, given as ``w_t (d, m)`` and ``w (m, d)`` in the product's dtype and ``w_acc (m, d)`` in the
    accumulation dtype.  Backward from the saved features (:func:`_query_grad`, :func:`_key_grad`): six kernels,
    the gradients written in the projections' time-first layout (no copies behind them).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, w_t: Tensor, w: Tensor, w_acc: Tensor, half_sq: float, dtype):
        qf = torch.softmax(_time_first_matmul(q, w_t), dim=-1, dtype=dtype)
        logits = _key_logits(k, w_t, half_sq)
        run = torch.cummax(logits.amax(-1), dim=-1).values  # c (B, H, S)
        decay = _log_decay(run)
        logits = logits.sub_(run.unsqueeze(-1))
        feats = op_new(torch.exp, logits.shape, dtype, logits)
        ctx.save_for_backward(k, w, w_acc, qf, feats)
        ctx.half_sq = half_sq
        ctx.mark_non_differentiable(decay)
        return qf, feats, decay

    @staticmethod
    def backward(ctx, grad_q: Optional[Tensor], grad_k: Optional[Tensor], _):
        k, w, w_acc, qf, kf = ctx.saved_tensors
        gq = None if grad_q is None else _query_grad(grad_q, qf, w)
        gk = None if grad_k is None else _key_grad(grad_k, kf, k, w_acc, ctx.half_sq)
        return gq, gk, None, None, None, None, None


def _rows(x: Tensor) -> Tensor:
    """``(L, B*H, d)`` rows of ``x (B, H, L, d)``: a view of a time-first tensor (the projections' layout), else a
    copy."""
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1, x.shape[-1])


def _length_product(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_l a_lᵀ b_l`` ``(B*H, m, n)`` for contiguous ``a (L, B*H, m)``, ``b (L, B*H, n)`` in their dtype (fp32
    accumulation).  On CUDA a long ``L`` is split into the linear op's number of chunks (``_split_k``: one output
    tile per (batch, head) leaves the GPU idle), taken interleaved (chunk ``i`` holds rows ``i, i + n, ...``) so
    that chunks, batches and heads share one stride and nothing is copied."""
    length, bh, m = a.shape
    n = _split_k(length, a)
    if n == 1:
        return torch.bmm(a.permute(1, 2, 0), b.transpose(0, 1))
    a3, b3 = a.view(length // n, n * bh, m), b.view(length // n, n * bh, b.shape[-1])
    return torch.bmm(a3.permute(1, 2, 0), b3.transpose(0, 1)).view(n, bh, m, b.shape[-1]).sum(0)


class _NoncausalFavor(torch.autograd.Function):
    """Noncausal FAVOR+ of unpadded inputs as one autograd node: ``out (B, H, T, d)`` in ``dtype`` (time-first
    memory) from ``q (B, H, T, d)``, ``k``, ``v (B, H, S, d)`` in the product's dtype (``w_t``'s; time-first
    memory, the projections' layout, saves copies).

    ``φ(q) = softmax_m(W' q)``, ``φ(k) = exp(W' k - s²|k|²/2 - c)`` (``c``: the max over every key and feature of
    the (batch, head); both factors cancel), ``kv = Σ_j φ(k_j) v_jᵀ``, ``z = Σ_j φ(k_j)``,
    ``out = φ(q) kv / φ(q)·z``: every product in the product's dtype with fp32 accumulation, no ``[v, 1]``
    copy, no autograd record of the chain.  Backward, with ``gn = g / den`` and ``r = Σ_d gn∘out``:
    ``∂φ(q) = gn kvᵀ - r zᵀ``, ``∂kv = Σ_t φ(q_t)ᵀ gn_t``, ``∂z = -Σ_t φ(q_t) r_t``, ``∂v = φ(k) ∂kv``,
    ``∂φ(k) = v ∂kvᵀ + ∂z``, then :func:`_query_grad` and :func:`_key_grad`.  Tensors are kept as time-first
    rows ``(L, B*H, ·)`` and ``(B*H, ·, ·)`` products.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, w_t: Tensor, w: Tensor, w_acc: Tensor, half_sq: float, dtype):
        bsz, heads, tgt_len, dim = q.shape
        fd = w_t.dtype
        qf = torch.softmax(torch.matmul(_rows(q), w_t), dim=-1, dtype=fd)  # (T, B*H, m)
        kr = _rows(k)
        logits = _key_logits(kr, w_t, half_sq)  # (S, B*H, m) in the accumulation dtype
        logits = logits.sub_(logits.amax(dim=(0, 2), keepdim=True))
        if fd == logits.dtype:
            kf = logits.exp_()
        else:
            kf = op_new(torch.exp, logits.shape, fd, logits)
        vr = _rows(v)
        kv = _length_product(kf, vr)  # (B*H, m, d)
        z = kf.sum(0).unsqueeze(-1)  # (B*H, m, 1)
        qt = qf.transpose(0, 1)
        den = torch.bmm(qt, z).clamp_min_(torch.finfo(fd).tiny)  # (B*H, T, 1); 0 only where nothing was seen
        num = torch.bmm(qt, kv).transpose(0, 1)  # (T, B*H, d)
        out = op_new(torch.div, num.shape, dtype, num, den.transpose(0, 1)).view(tgt_len, bsz, heads, dim)
        ctx.save_for_backward(kr, vr, w, w_acc, qf, kf, kv, z, den, out)
        ctx.half_sq, ctx.v_layout = half_sq, (v.shape, dense_strides(v))
        return out.permute(1, 2, 0, 3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kr, vr, w, w_acc, qf, kf, kv, z, den, out = ctx.saved_tensors
        tgt_len, bsz, dim = qf.shape[0], out.shape[1], out.shape[3]
        gn = _rows(grad) / den.transpose(0, 1)  # (T, B*H, d)
        r = (gn * out.view(tgt_len, -1, dim)).sum(-1, keepdim=True)  # (T, B*H, 1): -∂den
        gqf = torch.bmm(gn.transpose(0, 1), kv.transpose(1, 2))  # (B*H, T, m)
        gqf.baddbmm_(r.transpose(0, 1), z.transpose(1, 2), alpha=-1.0)
        gkv, rq = _length_product(qf, gn), _length_product(qf, r)  # ∂kv (B*H, m, d), -∂z (B*H, m, 1)
        del gn  # (an (L, B, C) tensor: gone before the three input gradients are made)
        gkf = torch.baddbmm(rq.transpose(1, 2), vr.transpose(0, 1), gkv.transpose(1, 2), beta=-1.0)  # (B*H, S, m)
        # ∂k first: its fp32 temporaries come and go before the other two gradients exist (the step's peak)
        gk = _key_grad(gkf.transpose(0, 1), kf, kr, w_acc, ctx.half_sq)
        gv = heads_bmm(kf.transpose(0, 1), gkv, *ctx.v_layout)  # in v's layout: no copy back to the projection
        gq = _query_grad(gqf.transpose(0, 1), qf, w)
        return _heads(gq, bsz), _heads(gk, bsz), gv, None, None, None, None, None


def _heads(rows: Tensor, bsz: int) -> Tensor:
    """``(B, H, L, d)`` view of time-first rows ``(L, B*H, d)``."""
    length, bh, dim = rows.shape
    return rows.view(length, bsz, bh // bsz, dim).permute(1, 2, 0, 3)


@register_attention("performer", "favor")
class Performer(EfficientAttention):
    """FAVOR+ linear attention with positive orthogonal random features.

    Math: ``φ(x) = exp(W x' - |x'|²/2)`` (``x' = x d^(-1/4)``, ``W`` is ``(m, d)``),
    ``out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)`` over the keys ``j`` query ``i`` may see.
    Features are stabilised by subtracting the query's own max logit and the
    running max key logit (both cancel in the ratio).

    Shapes: q ``(B, H, T, d)``, k/v ``(B, H, S, d)``; ``W`` is the buffer
    ``projection_matrix`` ``(approx_attn_dim, d)`` shared by the heads and
    saved in the ``state_dict`` (with the redraw counter).  It is redrawn every
    ``feature_redraw_interval`` training forwards; evaluation is deterministic.

    Patterns: all four, through :func:`~efficient_attention.kernels.linear_attention.linear_attention`
    (causal: its chunked kernels, the running sums ``Σ φ(k) vᵀ``, ``Σ φ(k)`` never
    materialised per position; prefill hands its final sums to decoding, which
    keeps only those sums: constant state).  ``key_padding_mask`` is
    honoured; an arbitrary ``attn_mask`` is not (only the causal one).  No
    attention dropout (the paper has none).  Half inputs: features are computed in
    fp32 and rounded to the input dtype for the kernels, which accumulate in fp32.

    Cost: O((T + S)·m·d) time and O((T + S)·m + m·d) memory per head.
    """

    capabilities = Capabilities(
        patterns=ALL_PATTERNS, incremental=True, constant_state=True, backends=("kernels.linear_attention", "torch")
    )
    Options = PerformerOptions
    fused_projections = False  # its backward keeps k and v, not q (tests/test_projections.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._forwards_since_redraw = 0
        self.register_buffer("projection_matrix", self._draw_features(self.q_proj.weight.device))
        if self.dropout_p > 0:
            logger.info("Performer applies no attention dropout (dropout=%s is unused)", self.dropout_p)

    def _draw_features(self, device) -> Tensor:
        return gaussian_orthogonal_features(self.approx_attn_dim, self.head_dim, self.orthogonal_features, device)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a new projection matrix (in place, so the buffer stays registered)."""
        w = self._draw_features(self.projection_matrix.device)
        self.projection_matrix.copy_(w.to(self.projection_matrix.dtype))
        self._forwards_since_redraw = 0

    def get_extra_state(self) -> dict:
        """The redraw counter travels with the ``state_dict``, so a resumed run redraws at the same steps."""
        return {"forwards_since_redraw": self._forwards_since_redraw}

    def set_extra_state(self, state: dict) -> None:
        count = state.get("forwards_since_redraw") if isinstance(state, dict) else None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"Performer extra state must hold forwards_since_redraw >= 0, got {state!r}")
        self._forwards_since_redraw = count

    def _maybe_redraw(self) -> None:
        if self.training and self.feature_redraw_interval > 0:
            if self._forwards_since_redraw >= self.feature_redraw_interval:
                self.redraw_features()
            self._forwards_since_redraw += 1

    # --------------------------------------------------------------- features
    def _projection(self, x: Tensor) -> Tensor:
        """``W x'`` ``(B, H, L, m)`` with ``x' = x d^(-1/4)`` (the scale folded into the small ``W``).

        Under autocast the product runs in autocast's dtype, as it would anyway (``x`` is not up-cast first);
        otherwise in the accumulation dtype."""
        w = self.projection_matrix * self.head_dim**-0.25
        if not torch.is_autocast_enabled(x.device.type):
            x, w = x.to(acc_dtype(x.dtype)), w.to(acc_dtype(x.dtype))
        return torch.matmul(x, w.t())

    def _logits(self, x: Tensor) -> Tensor:
        """``W x' - |x'|²/2`` ``(B, H, L, m)`` in the accumulation dtype (two kernels: product, ``addcmul``)."""
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc_dtype(x.dtype))
        return torch.addcmul(self._projection(x), norm, norm, value=-0.5 * self.head_dim**-0.5)

    def _query_features(self, q: Tensor) -> Tensor:
        """``φ(q)`` up to a positive factor per query, which cancels in ``num / den``: ``softmax_m(W q')``
        (``-|q'|²/2`` and the max logit are such per-query factors): one product and one softmax."""
        return torch.softmax(self._projection(q), dim=-1, dtype=acc_dtype(q.dtype))

    def _key_logits(self, k: Tensor, kpm: Optional[Tensor]) -> Tensor:
        logits = self._logits(k)
        if kpm is not None:
            logits = logits.masked_fill(kpm[:, None, :, None], float("-inf"))
        return logits

    @staticmethod
    def _noncausal_key_features(logits: Tensor, kpm: Optional[Tensor]) -> Tensor:
        """``φ(k)`` up to one positive factor per (batch, head), which cancels in ``num / den``: a softmax over
        every key and feature (the global max subtracted, one kernel); all keys padded -> zeros."""
        flat = logits.flatten(-2)
        probs = torch.softmax(flat, dim=-1) if kpm is None else softmax(flat, dim=-1)
        return probs.view_as(logits)

    @staticmethod
    def _max(logits: Tensor) -> Tensor:
        """Max over positions and features, ``(B, H, 1, 1)``; ``-inf`` when every key is padding."""
        if logits.shape[-2] == 0:
            return logits.new_full((*logits.shape[:2], 1, 1), float("-inf"))
        return logits.detach().amax(dim=(-1, -2), keepdim=True)

    @staticmethod
    def _finite(x: Tensor) -> Tensor:
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    def _key_sums(self, logits: Tensor, v: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """Non-causal ``(Σ φ(k) vᵀ, Σ φ(k))`` with the global key max subtracted."""
        kf = torch.exp(logits - self._finite(self._max(logits)))
        _, (kv, ks) = linear_attention(kf[..., :0, :].to(dtype), kf.to(dtype), v, causal=False, return_state=True)
        assert ks is not None  # normalize=True (the default) keeps the normaliser sum
        return kv, ks

    # ----------------------------------------------------------------- causal
    def _new_state(self, q: Tensor, dtype: torch.dtype) -> Dict[str, Tensor]:
        bsz, heads, m, d = q.shape[0], self.num_heads, self.approx_attn_dim, self.head_dim
        return {
            "kv_sum": q.new_zeros(bsz, heads, m, d + 1, dtype=dtype),
            "k_max": q.new_full((bsz, heads, 1, 1), float("-inf"), dtype=dtype),
        }

    def _causal(
        self, qf: Tensor, k_logits: Tensor, v: Tensor, state: Optional[Dict[str, Tensor]], dtype, padded: bool = True
    ) -> Tensor:
        """Causal FAVOR+ for queries that are the last ``T`` of the ``S`` new keys (``state`` holds the past and
        receives the new sums; ``None``: a fresh sequence whose sums are not kept; ``padded=False`` promises
        finite logits).

        Key ``j`` enters at the running max ``c_j`` of the key logits so far (never a later key's, so a large
        future key cannot underflow the past): features ``exp(logit_j - c_j)`` and the log decay
        ``c_{j-1} - c_j`` of :func:`linear_attention` carry the sums to each query's scale.
        """
        tgt_len, src_len = qf.shape[-2], k_logits.shape[-2]
        blind = max(tgt_len - src_len, 0)  # queries before the first key see nothing
        if src_len == 0:
            return qf.new_zeros(*qf.shape[:-1], v.shape[-1])
        run = torch.cummax(k_logits.detach().amax(-1), dim=-1).values  # c (B, H, S)
        if state is None and not padded:  # every logit finite, nothing before: two kernels for the decay
            safe = run
            decay = _log_decay(run)
        else:
            past = run.new_full((*run.shape[:2], 1), float("-inf")) if state is None else state["k_max"].flatten(2)
            run = torch.maximum(run, past)
            safe = self._finite(run)
            prev = torch.cat([past, run[..., :-1]], dim=-1)
            decay = torch.where(torch.isfinite(prev), prev - safe, torch.zeros_like(safe))  # nothing before: no decay
        kf = torch.exp(k_logits - safe.unsqueeze(-1))
        qf, kf = qf[..., blind:, :].to(dtype), kf.to(dtype)
        if state is None:
            out = linear_attention(qf, kf, v, causal=True, log_decay=decay)
        else:
            kvz, d = state["kv_sum"], v.shape[-1]  # (B, H, m, d + 1): the last column is the normaliser sum
            init = (kvz[..., :d], kvz[..., d])
            out, (kv, ks) = linear_attention(
                qf, kf, v, causal=True, log_decay=decay, initial_state=init, return_state=True
            )
            assert ks is not None  # normalize=True (the default) keeps the normaliser sum
            state["kv_sum"] = torch.cat([kv, ks.unsqueeze(-1).to(kv.dtype)], dim=-1)
            state["k_max"] = run[..., -1:].unsqueeze(-1)
        return torch.cat([out.new_zeros(*out.shape[:2], blind, out.shape[-1]), out], dim=-2) if blind else out

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        self._maybe_redraw()
        kpm = masks.key_padding
        if kpm is None and k.shape[2] > 0 and (not self.causal or q.shape[2] <= k.shape[2]):
            return self._attend_unpadded(q, k, v), None
        qf = self._query_features(q)
        k_logits = self._key_logits(k, kpm)
        if self.causal:
            out = self._causal(qf, k_logits, v, None, q.dtype)
        else:  # fp32 features: the PyTorch noncausal path computes in fp32 anyway
            out = linear_attention(qf, self._noncausal_key_features(k_logits, kpm), v, causal=False)
        return out.to(q.dtype), None

    def _attend_unpadded(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The training path without padding: the same math with every dtype explicit (autocast off), one autograd
        node for the features (:class:`_CausalFeatures`) or for all of it (:class:`_NoncausalFavor`), the
        projections read and their gradients written without layout copies."""
        dtype, device = q.dtype, q.device.type
        autocast = torch.is_autocast_enabled(device) and acc_dtype(dtype) != torch.float64
        product = torch.get_autocast_dtype(device) if autocast else acc_dtype(dtype)
        with torch.autocast(device, enabled=False):
            w_t, w = self._feature_weight(product), self._feature_weight(product, rows=True)
            w_acc = self._feature_weight(acc_dtype(dtype), rows=True)
            q, k, half_sq = q.to(product), k.to(product), 0.5 * self.head_dim**-0.5
            if not self.causal:
                return _NoncausalFavor.apply(q, k, v.to(product), w_t, w, w_acc, half_sq, dtype)
            # the Triton kernels take features in the input dtype
            qf, kf, decay = _CausalFeatures.apply(q, k, w_t, w, w_acc, half_sq, dtype)
            return linear_attention(qf, kf, v, causal=True, log_decay=decay, out_dtype=dtype)

    def _attend_step(
        self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state: Dict[str, Any], masks: AttentionMasks
    ) -> Tensor:
        """Causal: the running sums ``kv_sum (B, H, m, d)``, ``k_sum (B, H, m)`` and key max ``k_max (B, H, 1, 1)``.
        Static keys: ``prev_key = Σ φ(k) vᵀ``, ``prev_value = Σ φ(k)``, summarised once."""
        if not self.causal:
            qf = self._query_features(q)

            def summarise(k: Tensor, v: Tensor, kpm: Optional[Tensor]) -> Dict[str, Any]:
                return dict(zip(("prev_key", "prev_value"), self._key_sums(self._key_logits(k, kpm), v, q.dtype)))

            self._static_kv(state, k, v, masks.key_padding, summarise)
            kv, ks = state["prev_key"], state["prev_value"]
            no_keys, no_values = qf[..., :0, :], kv.new_empty(*kv.shape[:2], 0, kv.shape[-1])
            out = linear_attention(qf, no_keys, no_values.to(qf.dtype), causal=False, initial_state=(kv, ks))
            return out.to(q.dtype)
        assert k is not None and v is not None  # causal decoding always brings the new queries' own keys
        tgt_len = q.shape[2]
        if k.shape[2] < tgt_len and "kv_sum" in state:
            raise ValueError(
                f"Performer decoding needs at least as many new keys ({k.shape[2]}) as new queries ({tgt_len})"
            )
        if tgt_len == 1 and k.shape[2] == 1 and "kv_sum" in state:  # one token: the recurrence, a few kernels
            return self._step(q, k, v, state, masks.key_padding)
        qf = self._query_features(q)
        logits = self._key_logits(k, masks.key_padding)
        dtype = acc_dtype(q.dtype)
        sums = {n: state[n] for n in ("kv_sum", "k_max")} if "kv_sum" in state else self._new_state(q, dtype)
        out = self._causal(qf, logits, v, sums, q.dtype)
        state.update(sums)
        return out.to(q.dtype)

    def _feature_weight(self, dtype: torch.dtype, rows: bool = False) -> Tensor:
        """``(W d^(-1/4))ᵀ`` ``(d, m)`` (``rows``: ``W d^(-1/4)`` ``(m, d)``, for the gradients) contiguous in
        ``dtype``, kept until the buffer changes (a redraw or a ``state_dict`` load writes it in place, which moves
        its version counter): no scaling, transposing or casting op per forward or decoding step.  Not kept where
        :func:`~efficient_attention.functional.may_keep_derived` says no (a captured CUDA graph computes it from
        the buffer at every replay, so a redraw between replays is seen)."""
        w = self.projection_matrix
        if not may_keep_derived(w) or w.is_inference():
            scaled = (w * self.head_dim**-0.25).to(dtype)
            return scaled if rows else scaled.t()
        version = (w.device, w._version, w.data_ptr())
        cache: Optional[Tuple[Any, Dict[Tuple[torch.dtype, bool], Tensor]]] = self.__dict__.get("_feature_w")
        if cache is None or cache[0] != version:  # a new matrix: the copies of the old one go
            cache = self.__dict__["_feature_w"] = (version, {})
        copies = cache[1]
        hit = copies.get((dtype, rows))
        if hit is None:
            scaled = (w * self.head_dim**-0.25).to(dtype)
            hit = copies[dtype, rows] = (scaled if rows else scaled.t()).contiguous()
        return hit

    FUSED_STEP_DEVICES = ("cuda",)  # device types whose decoding step is one Triton launch (tests add "cpu")

    def _fused_step_fits(self, q: Tensor, k: Tensor, v: Tensor, state: Dict[str, Any]) -> bool:
        """The Triton step takes this step: no autograd (generation), fp32 state, head dims the kernel holds."""
        kvz = state["kv_sum"]
        return (
            _TRITON_STEP.get("failed") is None
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and kvz.dtype == torch.float32
            and kvz.is_contiguous()
            and (torch.is_inference_mode_enabled() or not kvz.is_inference())  # (updated in place)
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and self.approx_attn_dim <= 256
            and self.head_dim <= 128
        )

    def _fused_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Dict[str, Any], product: torch.dtype
    ) -> Optional[Tensor]:
        """:meth:`_step` as one Triton launch (``kernels/_triton_performer.py``; the state updated in place), or
        ``None`` if Triton cannot run it (logged once at WARNING; the PyTorch step is used from then on)."""
        try:
            from ..kernels._triton_performer import performer_step

            c = state["k_max"]
            if not c.is_contiguous() or c.dtype != torch.float32:  # a prefill's (B, H, 1, 1) view: copied once
                c = state["k_max"] = c.float().contiguous()
            w_t = self._feature_weight(product)
            return performer_step(q, k, v, w_t, state["kv_sum"], c, 0.5 * self.head_dim**-0.5, product)
        except Exception as exc:  # noqa: BLE001 - a missing or failing Triton falls back to the PyTorch step
            _TRITON_STEP["failed"] = f"{type(exc).__name__}: {exc}"
            logger.warning("Performer decoding: the Triton step cannot run (%s); using the PyTorch step", exc)
            return None

    def _step(self, q: Tensor, k: Tensor, v: Tensor, state: Dict[str, Any], kpm: Optional[Tensor]) -> Tensor:
        """One causal token on the running sums: the math of :meth:`_causal` in under 30 ops (a decoding step is
        host-bound), or on CUDA without autograd in one Triton launch (:meth:`_fused_step`).  The query's and the
        key's projections are one product with the cached :meth:`_feature_weight`;
        the state ``kv_sum (B, H, m, d + 1)`` carries the normaliser sum as its last column, so one update and
        one product give numerator and denominator.  The running max ``c`` (``-inf`` while no key was seen, possible
        only with padding) is clamped to the lowest finite value instead of zeroed, which gives the same features
        (0 for a padded key) and a decay of 0 where :meth:`_causal` has 1 on sums that are 0."""
        dtype, acc = q.dtype, acc_dtype(q.dtype)
        bsz, heads, _, dim = q.shape
        device = q.device.type
        # the product in autocast's dtype under autocast (as _projection's), else in fp32; the rest in fp32
        autocast = torch.is_autocast_enabled(device) and acc != torch.float64
        product = torch.get_autocast_dtype(device) if autocast else acc
        if kpm is None and device in self.FUSED_STEP_DEVICES and self._fused_step_fits(q, k, v, state):
            out = self._fused_step(q, k, v, state, product)
            if out is not None:
                return out
        x = torch.cat([q, k], dim=2)  # (B, H, 2, d)
        proj = torch.mm(x.view(-1, dim).to(product), self._feature_weight(product)).view(bsz, heads, 2, -1)
        qf = torch.softmax(proj[:, :, :1], dim=-1, dtype=acc)  # (B, H, 1, m), up to a per-query factor
        norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=acc)
        logits = torch.addcmul(proj[:, :, 1:], norm, norm, value=-0.5 * self.head_dim**-0.5)
        if kpm is not None:
            logits = logits.masked_fill(kpm[:, None, :, None], float("-inf"))
        both = torch.cat([logits, state["k_max"]], dim=-1)  # the key's logits and the past max c (B, H, 1, m + 1)
        run = both.amax(-1, keepdim=True)  # the new c: finite unless this key is padded
        safe = run if kpm is None else run.clamp_min(torch.finfo(run.dtype).min)
        scaled = torch.exp(both - safe)  # the key's features and the decay exp(c - c') of the sums
        kf, decay = scaled[..., :-1], scaled[..., -1:]
        v1 = F.pad(v, (0, 1), value=1.0)  # [v, 1]: the normaliser rides along as a last value column
        kvz = torch.addcmul(state["kv_sum"] * decay, kf.transpose(-1, -2), v1)  # (B, H, m, d + 1)
        num_den = (qf.transpose(-1, -2) * kvz).sum(-2, keepdim=True)  # (B, H, 1, d + 1)
        # the normaliser is 0 only where nothing was attended (nonnegative features): the numerator is 0 too
        out = num_den[..., :dim] / num_den[..., dim:].clamp_min(torch.finfo(acc).tiny)
        state["kv_sum"], state["k_max"] = kvz, run
        return out.to(dtype)
