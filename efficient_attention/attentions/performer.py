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
from ..functional import acc_dtype, softmax
from ..kernels.linear_attention import linear_attention
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
    layout) is multiplied as that tensor, without the copy ``matmul`` would make, and keeps its layout."""
    tf = x.permute(2, 0, 1, 3)
    if tf.is_contiguous():
        return torch.matmul(tf, w_t).permute(1, 2, 0, 3)
    return torch.matmul(x, w_t)


def _log_decay(run: Tensor) -> Tensor:
    """``c_{j-1} - c_j`` of the running max ``run (B, H, S)`` with 0 first: the first entry repeated in front
    (one kernel), then one subtraction."""
    return F.pad(run, (1, 0), mode="replicate")[..., :-1] - run


class _KeyFeatures(torch.autograd.Function):
    """Performer key features of unpadded keys, one autograd node: ``φ (B, H, S, m)`` contiguous in ``dtype``
    (and, causal, the log decay ``(B, H, S)``).

    ``φ_j = exp(W' k_j - s²|k_j|²/2 - c_j)`` (``W' = s W`` given transposed, ``w_t (d, m)``, in the product's
    dtype and ``w_acc (d, m)`` in the accumulation dtype; ``s = d^(-1/4)``; ``c`` carries no gradient): ``c`` is
    the max over every key and feature (noncausal) or the running max over the keys so far (causal, log decay
    ``c_{j-1} - c_j``).  Forward: product, norm, ``addcmul``, max, ``exp`` written in ``dtype``; backward from
    the saved features, ``∂k = (g∘φ) W' - s² k Σ_m (g∘φ)``: four kernels and a cast, where autograd would record
    about fifteen.
    """

    @staticmethod
    def forward(ctx, k: Tensor, w_t: Tensor, w_acc: Tensor, half_sq: float, causal: bool, dtype: torch.dtype):
        acc = acc_dtype(dtype)
        norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=acc)
        logits = torch.addcmul(_time_first_matmul(k, w_t), norm, norm, value=-half_sq)
        decay = None
        if causal:
            run = torch.cummax(logits.amax(-1), dim=-1).values  # c (B, H, S)
            decay = _log_decay(run)
            logits = logits.sub_(run.unsqueeze(-1))
        else:  # (a softmax over keys and features would need the (L, m) rows contiguous: a copy)
            logits = logits.sub_(logits.amax(dim=(-1, -2), keepdim=True))
        feats = torch.exp(logits, out=torch.empty(logits.shape, dtype=dtype, device=logits.device))
        ctx.save_for_backward(k, w_acc, feats)
        ctx.half_sq = half_sq
        if decay is None:
            return feats
        ctx.mark_non_differentiable(decay)
        return feats, decay

    @staticmethod
    def backward(ctx, grad: Tensor, *_):
        k, w_acc, feats = ctx.saved_tensors
        acc = acc_dtype(feats.dtype)
        gl = torch.mul(grad, feats, out=torch.empty(feats.shape, dtype=acc, device=feats.device))  # ∂ logits
        gk = torch.matmul(gl, w_acc.t())
        gk = torch.addcmul(gk, k, gl.sum(-1, keepdim=True), value=-2.0 * ctx.half_sq)
        return gk.to(k.dtype), None, None, None, None, None


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

    capabilities = Capabilities(patterns=ALL_PATTERNS, incremental=True, constant_state=True)
    Options = PerformerOptions

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
        """The training path without padding: the same math with every dtype explicit (autocast off), the key
        features from :class:`_KeyFeatures` and the projections without layout copies."""
        dtype, device = q.dtype, q.device.type
        product = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else acc_dtype(dtype)
        with torch.autocast(device, enabled=False):
            w_t, w_acc = self._feature_weight(product), self._feature_weight(acc_dtype(dtype))
            half_sq = 0.5 * self.head_dim**-0.5
            feature_dtype = dtype if self.causal else acc_dtype(dtype)  # the Triton kernels take the input dtype
            qf = torch.softmax(_time_first_matmul(q.to(product), w_t), dim=-1, dtype=feature_dtype)
            if self.causal:  # the Triton kernels take features in the input dtype
                kf, decay = _KeyFeatures.apply(k.to(product), w_t, w_acc, half_sq, True, dtype)
                out = linear_attention(qf, kf, v, causal=True, log_decay=decay, out_dtype=dtype)
            else:
                kf = _KeyFeatures.apply(k.to(product), w_t, w_acc, half_sq, False, acc_dtype(dtype))
                out = linear_attention(qf, kf, v, causal=False, out_dtype=dtype)
        return out

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

    def _feature_weight(self, dtype: torch.dtype) -> Tensor:
        """``(W d^(-1/4))ᵀ`` ``(d, m)`` contiguous in ``dtype``, kept until the buffer changes (a redraw or a
        ``state_dict`` load writes it in place, which moves its version counter): no scaling, transposing or
        casting op per forward or decoding step."""
        w = self.projection_matrix
        if torch.compiler.is_compiling() or w.is_inference():
            return (w * self.head_dim**-0.25).t().to(dtype)
        version = (w.device, w._version, w.data_ptr())
        cache: Optional[Tuple[Any, Dict[torch.dtype, Tensor]]] = self.__dict__.get("_feature_w")
        if cache is None or cache[0] != version:  # a new matrix: the copies of the old one go
            cache = self.__dict__["_feature_w"] = (version, {})
        copies = cache[1]
        hit = copies.get(dtype)
        if hit is None:
            hit = copies[dtype] = (w * self.head_dim**-0.25).t().to(dtype).contiguous()
        return hit

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
        if kpm is None and q.is_cuda and self._fused_step_fits(q, k, v, state):
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
