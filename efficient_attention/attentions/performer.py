"""Performer (Choromanski et al., 2020): softmax attention through positive random features (FAVOR+).

``exp(q·k/√d) ≈ φ(q)·φ(k)`` with ``φ(x) = exp(W x' - |x'|²/2)``, ``x' = x d^(-1/4)``
and ``m`` orthogonal Gaussian rows ``W``; ``out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)``.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention, check_bool
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import acc_dtype
from ..kernels.linear_attention import linear_attention
from ..registry import register_attention

__all__ = ["Performer"]

logger = logging.getLogger(__name__)

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
    option_help = {
        "approx_attn_dim": "number of random features m",
        "orthogonal_features": "draw the random features in orthogonal blocks (else i.i.d. Gaussian)",
        "feature_redraw_interval": "redraw the random features every this many training forwards (0: never)",
    }
    projection_matrix: Tensor  # buffer (m, d), registered in __init__

    def __init__(
        self,
        *args,
        approx_attn_dim: int = 16,
        orthogonal_features: bool = True,
        feature_redraw_interval: int = 1000,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if isinstance(approx_attn_dim, bool) or not isinstance(approx_attn_dim, int) or approx_attn_dim <= 0:
            raise ValueError(f"approx_attn_dim must be a positive integer, got {approx_attn_dim!r}")
        if (
            isinstance(feature_redraw_interval, bool)
            or not isinstance(feature_redraw_interval, int)
            or feature_redraw_interval < 0
        ):
            raise ValueError(f"feature_redraw_interval must be an integer >= 0, got {feature_redraw_interval!r}")
        self.approx_attn_dim = approx_attn_dim
        self.orthogonal_features = check_bool(orthogonal_features, "orthogonal_features")
        self.feature_redraw_interval = feature_redraw_interval
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
    def _logits(self, x: Tensor) -> Tensor:
        """``W x' - |x'|²/2`` ``(B, H, L, m)`` in the accumulation dtype."""
        x = x.to(acc_dtype(x.dtype)) * self.head_dim**-0.25
        w = self.projection_matrix.to(x.dtype)
        return torch.matmul(x, w.t()) - 0.5 * (x * x).sum(-1, keepdim=True)

    def _query_features(self, q: Tensor) -> Tensor:
        logits = self._logits(q)
        return torch.exp(logits - logits.amax(-1, keepdim=True).detach())

    def _key_logits(self, k: Tensor, kpm: Optional[Tensor]) -> Tensor:
        logits = self._logits(k)
        if kpm is not None:
            logits = logits.masked_fill(kpm[:, None, :, None], float("-inf"))
        return logits

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
        _, (kv_sum, k_sum) = linear_attention(kf[..., :0, :].to(dtype), kf.to(dtype), v, causal=False, return_state=True)
        assert k_sum is not None  # normalize=True keeps z
        return kv_sum, k_sum

    # ----------------------------------------------------------------- causal
    def _new_state(self, q: Tensor, dtype: torch.dtype) -> Dict[str, Tensor]:
        bsz, heads, m, d = q.shape[0], self.num_heads, self.approx_attn_dim, self.head_dim
        return {
            "kv_sum": q.new_zeros(bsz, heads, m, d, dtype=dtype),
            "k_sum": q.new_zeros(bsz, heads, m, dtype=dtype),
            "k_max": q.new_full((bsz, heads, 1, 1), float("-inf"), dtype=dtype),
        }

    def _causal(self, qf: Tensor, k_logits: Tensor, v: Tensor, state: Dict[str, Tensor], dtype) -> Tensor:
        """Causal FAVOR+ for queries that are the last ``T`` of the ``S`` new keys (``state`` holds the past).

        Key ``j`` enters at the running max ``c_j`` of the key logits so far (never a later key's, so a large
        future key cannot underflow the past): features ``exp(logit_j - c_j)`` and the log decay
        ``c_{j-1} - c_j`` of :func:`linear_attention` carry the sums to each query's scale.
        """
        tgt_len, src_len = qf.shape[-2], k_logits.shape[-2]
        blind = max(tgt_len - src_len, 0)  # queries before the first key see nothing
        if src_len == 0:
            return qf.new_zeros(*qf.shape[:-1], v.shape[-1])
        past = state["k_max"].flatten(2)  # (B, H, 1)
        run = torch.maximum(torch.cummax(k_logits.detach().amax(-1), dim=-1).values, past)  # c (B, H, S)
        safe = self._finite(run)
        prev = torch.cat([past, run[..., :-1]], dim=-1)
        decay = torch.where(torch.isfinite(prev), prev - safe, torch.zeros_like(safe))  # nothing before: no decay
        kf = torch.exp(k_logits - safe.unsqueeze(-1))
        out, (kv_sum, k_sum) = linear_attention(
            qf[..., blind:, :].to(dtype), kf.to(dtype), v, causal=True, log_decay=decay,
            initial_state=(state["kv_sum"], state["k_sum"]), return_state=True,
        )
        assert k_sum is not None  # normalize=True keeps z
        state["kv_sum"], state["k_sum"] = kv_sum, k_sum
        state["k_max"] = run[..., -1:].unsqueeze(-1)
        return torch.cat([out.new_zeros(*out.shape[:2], blind, out.shape[-1]), out], dim=-2) if blind else out

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        self._maybe_redraw()
        qf = self._query_features(q)
        k_logits = self._key_logits(k, masks.key_padding)
        if self.causal:
            out = self._causal(qf, k_logits, v, self._new_state(q, acc_dtype(q.dtype)), q.dtype)
        else:
            kf = torch.exp(k_logits - self._finite(self._max(k_logits)))
            out = linear_attention(qf.to(q.dtype), kf.to(q.dtype), v, causal=False)
        return out.to(q.dtype), None

    def _attend_step(self, q, k, v, state, masks: AttentionMasks, attn_mask, need_weights, static_kv):
        tgt_len = q.shape[2]
        kpm = masks.key_padding  # bool; a causal attn_mask was checked and dropped by the base
        qf = self._query_features(q)
        if static_kv:
            if "prev_key" not in state:  # keys are summarised once: prev_key = Σφ(k)vᵀ, prev_value = Σφ(k)
                state["prev_key"], state["prev_value"] = self._key_sums(self._key_logits(k, kpm), v, q.dtype)
            kv, ks = state["prev_key"], state["prev_value"]
            no_keys, no_values = qf[..., :0, :], kv.new_empty(*kv.shape[:2], 0, kv.shape[-1])
            out = linear_attention(qf, no_keys, no_values.to(qf.dtype), causal=False, initial_state=(kv, ks))
            return out.to(q.dtype), None
        if k.shape[2] < tgt_len and "kv_sum" in state:
            raise ValueError(
                f"Performer decoding needs at least as many new keys ({k.shape[2]}) as new queries ({tgt_len})"
            )
        dtype = acc_dtype(q.dtype)
        sums = {n: state[n] for n in ("kv_sum", "k_sum", "k_max")} if "kv_sum" in state else self._new_state(q, dtype)
        out = self._causal(qf, self._key_logits(k, kpm), v, sums, q.dtype)
        state.update(sums)
        return out.to(q.dtype), None
