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
from ..functional import acc_dtype, safe_divide
from ..masks import causal_mask
from ..registry import register_attention

__all__ = ["Performer"]

logger = logging.getLogger(__name__)

_CHUNK = 64  # causal chunk length: memory O(N·m·d / _CHUNK) for the saved running sums


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
    saved in the ``state_dict``.  It is redrawn every
    ``feature_redraw_interval`` training forwards; evaluation is deterministic.

    Patterns: all four.  Causal attention uses running sums ``Σ φ(k) vᵀ`` and
    ``Σ φ(k)`` computed by chunks of 64 (never an ``(N, m, d)`` tensor), and
    decoding keeps only those sums (constant state).  ``key_padding_mask`` is
    honoured; an arbitrary ``attn_mask`` is not (only the causal one).  No
    attention dropout (the paper has none).  Half inputs compute in fp32.

    Cost: O((T + S)·m·d) time and O((T + S)·m + m·d) memory per head.
    """

    capabilities = Capabilities(patterns=ALL_PATTERNS, incremental=True, constant_state=True)
    option_help = {
        "approx_attn_dim": "number of random features m",
        "orthogonal_features": "draw the random features in orthogonal blocks (else i.i.d. Gaussian)",
        "feature_redraw_interval": "redraw the random features every this many training forwards (0: never)",
    }

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

    def _key_sums(self, logits: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Non-causal ``(Σ φ(k) vᵀ, Σ φ(k))`` with the global key max subtracted."""
        mx = self._max(logits)
        kf = torch.exp(logits - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
        return torch.matmul(kf.transpose(-1, -2), v), kf.sum(-2)

    # ----------------------------------------------------------------- causal
    def _new_state(self, q: Tensor, dtype: torch.dtype) -> Dict[str, Tensor]:
        bsz, heads, m, d = q.shape[0], self.num_heads, self.approx_attn_dim, self.head_dim
        return {
            "kv_sum": q.new_zeros(bsz, heads, m, d, dtype=dtype),
            "k_sum": q.new_zeros(bsz, heads, m, dtype=dtype),
            "k_max": q.new_full((bsz, heads, 1, 1), float("-inf"), dtype=dtype),
        }

    @staticmethod
    def _rescale(state: Dict[str, Tensor], logits: Tensor) -> Tensor:
        """Raise the running max to cover ``logits``; rescale the sums; return the new key features."""
        new_max = torch.maximum(state["k_max"], Performer._max(logits))
        finite = torch.isfinite(new_max)
        safe_max = torch.where(finite, new_max, torch.zeros_like(new_max))
        scale = torch.where(torch.isfinite(state["k_max"]), torch.exp(state["k_max"] - safe_max), torch.zeros_like(safe_max))
        state["kv_sum"] = state["kv_sum"] * scale
        state["k_sum"] = state["k_sum"] * scale.squeeze(-1)
        state["k_max"] = new_max
        return torch.exp(logits - safe_max)

    def _causal(self, qf: Tensor, k_logits: Tensor, v: Tensor, state: Dict[str, Tensor]) -> Tensor:
        """Causal FAVOR+ for queries that are the last ``T`` of the ``S`` new keys (state holds the past)."""
        tgt_len, src_len = qf.shape[-2], k_logits.shape[-2]
        offset = src_len - tgt_len
        if offset > 0:  # keys every query sees
            kf = self._rescale(state, k_logits[..., :offset, :])
            state["kv_sum"] = state["kv_sum"] + torch.matmul(kf.transpose(-1, -2), v[..., :offset, :])
            state["k_sum"] = state["k_sum"] + kf.sum(-2)
            k_logits, v = k_logits[..., offset:, :], v[..., offset:, :]
        blind = max(-offset, 0)  # queries before the first key see nothing
        outs = [qf.new_zeros(*qf.shape[:2], blind, v.shape[-1])]
        qf = qf[..., blind:, :]
        # split (not slicing in a loop): its backward concatenates once instead of one full-size gradient per chunk
        for q_c, k_c, v_c in zip(*(t.split(_CHUNK, dim=-2) for t in (qf, k_logits, v))):
            outs.append(self._chunk(q_c, k_c, v_c, state))
        return torch.cat(outs, dim=-2)

    @staticmethod
    def _chunk(qf: Tensor, logits: Tensor, v: Tensor, state: Dict[str, Tensor]) -> Tensor:
        """One chunk of aligned queries/keys.  Query ``i`` is stabilised by the running max ``c_i`` of
        the keys ``<= i`` only (so a large future key never underflows the past): key ``j`` enters
        with ``exp(logit_j - c_j) · exp(c_j - c_i)`` and the running sums with ``exp(max_past - c_i)``."""
        neg_inf = float("-inf")
        past_max = state["k_max"].flatten(2)  # (B, H, 1)
        run = torch.maximum(torch.cummax(logits.detach().amax(-1), dim=-1).values, past_max)  # (B, H, c)
        safe = torch.where(torch.isfinite(run), run, torch.zeros_like(run))
        e = torch.exp(logits - safe.unsqueeze(-1))  # (B, H, c, m), each key at its own running max
        c = logits.shape[-2]
        rel = (safe.unsqueeze(-2) - safe.unsqueeze(-1)).masked_fill(causal_mask(c, c, device=e.device), neg_inf)
        intra = torch.matmul(qf, e.transpose(-1, -2)) * torch.exp(rel)  # (B, H, c_i, c_j), exp(c_j - c_i)
        finite_past = torch.isfinite(past_max)
        past = torch.where(finite_past, torch.exp(past_max - safe), torch.zeros_like(safe))  # (B, H, c)
        num = torch.matmul(intra, v) + past.unsqueeze(-1) * torch.matmul(qf, state["kv_sum"])
        den = intra.sum(-1) + past * torch.matmul(qf, state["k_sum"].unsqueeze(-1)).squeeze(-1)
        last = safe[..., -1:]  # the sums move to the scale of the chunk's last position
        to_last = e * torch.exp(safe - last).unsqueeze(-1)
        carry = torch.where(finite_past, torch.exp(past_max - last), torch.zeros_like(last))
        state["kv_sum"] = state["kv_sum"] * carry.unsqueeze(-1) + torch.matmul(to_last.transpose(-1, -2), v)
        state["k_sum"] = state["k_sum"] * carry + to_last.sum(-2)
        state["k_max"] = run[..., -1:].unsqueeze(-1)
        return safe_divide(num, den)

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        self._maybe_redraw()
        dtype = acc_dtype(q.dtype)
        qf = self._query_features(q)
        k_logits = self._key_logits(k, masks.key_padding)
        v32 = v.to(dtype)
        if self.causal:
            out = self._causal(qf, k_logits, v32, self._new_state(q, dtype))
        else:
            kv, ks = self._key_sums(k_logits, v32)
            out = safe_divide(torch.matmul(qf, kv), torch.matmul(qf, ks.unsqueeze(-1)).squeeze(-1))
        return out.to(q.dtype), None

    def _attend_step(self, q, k, v, state, masks: AttentionMasks, attn_mask, need_weights, static_kv):
        tgt_len = q.shape[2]
        kpm = masks.key_padding  # bool; a causal attn_mask was checked and dropped by the base
        dtype = acc_dtype(q.dtype)
        qf = self._query_features(q)
        if static_kv:
            if "prev_key" not in state:  # keys are summarised once: prev_key = Σφ(k)vᵀ, prev_value = Σφ(k)
                state["prev_key"], state["prev_value"] = self._key_sums(self._key_logits(k, kpm), v.to(dtype))
            kv, ks = state["prev_key"], state["prev_value"]
            out = safe_divide(torch.matmul(qf, kv), torch.matmul(qf, ks.unsqueeze(-1)).squeeze(-1))
            return out.to(q.dtype), None
        if k.shape[2] < tgt_len and "kv_sum" in state:
            raise ValueError(
                f"Performer decoding needs at least as many new keys ({k.shape[2]}) as new queries ({tgt_len})"
            )
        sums = {n: state[n] for n in ("kv_sum", "k_sum", "k_max")} if "kv_sum" in state else self._new_state(q, dtype)
        out = self._causal(qf, self._key_logits(k, kpm), v.to(dtype), sums)
        state.update(sums)
        return out.to(q.dtype), None
