"""ProbSparse attention (Informer, Zhou et al. 2021).

Each query's sparsity score ``M_i = max_j s_ij - mean_j s_ij`` is estimated on
``U = factor·⌈ln L_K⌉`` sampled keys; only the "active" queries with the largest
scores get exact softmax attention, the others output the mean of the values
they can see.  Noncausal: the top ``u = factor·⌈ln L_Q⌉`` queries.  Causal
(masked ProbSparse): a query samples only keys it may see, and it is active iff
its score is among the ``u_i = factor·⌈ln(i+1)⌉`` largest of queries ``0..i``
(a running top-u, so the selection never looks at the future; Informer's global
top-u would).  Sampling is random in training and a fixed hash of (query
position, sample index) in eval: deterministic, and the same in decoding.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention, _cat_padding
from ..capabilities import SELF_PATTERNS, Capabilities
from ..functional import acc_dtype, softmax
from ..registry import register_attention

__all__ = ["ProbSparse"]

_CHUNK = 256  # queries per block in the score sampling and the running top-u


def log_count(factor: int, n: int) -> int:
    """``factor·⌈ln n⌉`` clamped to ``[1, n]``."""
    return max(1, min(n, factor * math.ceil(math.log(max(n, 1)))))


def log_counts(factor: int, n: Tensor) -> Tensor:
    """:func:`log_count` of every entry of a long tensor."""
    logs = torch.ceil(torch.log(n.clamp(min=1).double())).long()
    return torch.minimum((factor * logs).clamp(min=1), n.clamp(min=1))


def hash_samples(pos: Tensor, n_visible: Tensor, count: int, seed: int = 0x5EED) -> Tensor:
    """Deterministic key indices ``(T, count)`` in ``[0, n_visible)`` from (position, sample) pairs."""
    s = torch.arange(count, device=pos.device, dtype=torch.long)
    h = (pos.long()[:, None] * 73856093) ^ (s[None] * 19349663) ^ seed
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    h = ((h ^ (h >> 16)) * 668265263) & 0x7FFFFFFF
    return (h ^ (h >> 15)) % n_visible[:, None]


@register_attention("probsparse", "prob_sparse", "informer")
class ProbSparse(EfficientAttention):
    """Informer's ProbSparse self-attention (noncausal, and masked/causal).

    ``out_i = softmax(q_i Kᵀ/√d) V`` for the active queries (see the module
    docstring), ``mean_{j visible} v_j`` for the others.  Padded keys never
    count (not sampled, not attended, not averaged) and padded queries are
    never selected.  Shapes ``(T, B, C)``.  Patterns: noncausal self, causal
    self.  Cost O(L ln L · d) for scores and selection plus O(u_active · L · d)
    for the active rows (causal: the running top-u keeps about
    ``u·(1 + ln(L/u))`` rows).  Decoding keeps the key/value cache and the past
    sparsity scores.
    """

    capabilities = Capabilities(patterns=SELF_PATTERNS, incremental=True, backends=("torch",))
    option_help = {"factor": "sampling factor c: c·⌈ln L⌉ sampled keys per query and (noncausal) active queries"}

    def __init__(self, *args, factor: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.factor = factor

    # ---------------------------------------------------------------- pieces
    def sample_keys(self, pos: Tensor, n_visible: Tensor, count: int) -> Tensor:
        """Key indices ``(T, count)``: random in training, :func:`hash_samples` in eval."""
        if self.training:
            r = torch.rand(pos.shape[0], count, device=pos.device)
            return torch.minimum((r * n_visible[:, None]).long(), n_visible[:, None] - 1)
        return hash_samples(pos, n_visible, count)

    def _sparsity(self, q: Tensor, k: Tensor, q_pos: Tensor, kpm: Optional[Tensor]) -> Tensor:
        """``M (B, H, T)`` from sampled keys (causal: keys ``<= pos``); -inf where no valid key was sampled."""
        src_len = k.shape[2]
        n_visible = (q_pos + 1).clamp(max=src_len) if self.causal else torch.full_like(q_pos, src_len)
        count = log_count(self.factor, int(n_visible.max().item()))
        per_row = log_counts(self.factor, n_visible)
        idx = self.sample_keys(q_pos, n_visible, count)                              # (T, U)
        valid = torch.arange(count, device=q.device)[None] < per_row[:, None]          # (T, U)
        real = acc_dtype(q.dtype)
        parts = []
        with torch.no_grad():  # the scores only select queries: no gradient, no saved (B, H, T, U, d) gathers
            for start in range(0, q.shape[2], _CHUNK):
                sl = slice(start, start + _CHUNK)
                ks = k[:, :, idx[sl]].to(real)                                        # (B, H, c, U, d)
                s = (ks * q[:, :, sl, None, :].to(real)).sum(-1) * self.scaling        # (B, H, c, U)
                ok = valid[sl][None, None]
                if kpm is not None:
                    ok = ok & ~kpm[:, idx[sl]][:, None]
                n = ok.sum(-1)
                top = s.masked_fill(~ok, float("-inf")).amax(-1)
                mean = s.masked_fill(~ok, 0.0).sum(-1) / n.clamp(min=1)
                parts.append(torch.where(n > 0, top - mean, torch.full_like(top, float("-inf"))))
        return torch.cat(parts, -1)

    def _running_active(self, m_new: Tensor, m_prev: Optional[Tensor], q_pos: Tensor) -> Tensor:
        """Causal selection: query ``i`` is active iff fewer than ``u_i`` earlier queries score higher."""
        u = log_counts(self.factor, q_pos + 1)
        earlier = torch.tril(torch.ones(m_new.shape[-1], m_new.shape[-1], dtype=torch.bool, device=m_new.device), -1)
        count = ((m_new[..., None, :] > m_new[..., :, None]) & earlier).sum(-1)
        if m_prev is not None and m_prev.shape[-1]:
            count = count + (m_prev[..., None, :] > m_new[..., :, None]).sum(-1)
        return count < u

    def _causal_selection(self, m: Tensor, q_pos: Tensor) -> Tensor:
        """The running top-u of a whole sequence by chunks, keeping only the prefix's top ``u_max`` scores."""
        u_max = log_count(self.factor, int(q_pos[-1].item()) + 1)
        active, prefix = [], None
        for start in range(0, m.shape[-1], _CHUNK):
            chunk = m[..., start:start + _CHUNK]
            active.append(self._running_active(chunk, prefix, q_pos[start:start + _CHUNK]))
            merged = chunk if prefix is None else torch.cat([prefix, chunk], -1)
            prefix = merged.topk(min(u_max, merged.shape[-1]), dim=-1).values
        return torch.cat(active, -1)

    def _lazy(self, v: Tensor, kpm: Optional[Tensor], q_pos: Tensor) -> Tensor:
        """Mean of the visible, non-padded values ``(B, H, T, d)`` (causal: a running mean)."""
        real = acc_dtype(v.dtype)
        keep = torch.ones(v.shape[0], v.shape[2], dtype=real, device=v.device) if kpm is None else (~kpm).to(real)
        vv = v.to(real) * keep[:, None, :, None]
        if self.causal:
            total, count = vv.cumsum(2)[:, :, q_pos], keep.cumsum(1)[:, None, q_pos, None]
        else:
            total, count = vv.sum(2, keepdim=True), keep.sum(1)[:, None, None, None]
        return (total / count.clamp(min=1)).expand(-1, -1, q_pos.shape[0], -1).to(v.dtype)

    def _exact_rows(self, q: Tensor, k: Tensor, v: Tensor, active: Tensor, q_pos: Tensor, kpm: Optional[Tensor],
                    out: Tensor) -> Tensor:
        """Exact softmax attention for the active queries, written into ``out``."""
        n_act = int(active.sum(-1).max().item())
        if n_act == 0:
            return out
        rows = torch.sort(active.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n_act]  # (B, H, A)
        ok = torch.gather(active, -1, rows)
        qa = torch.gather(q, 2, rows[..., None].expand(-1, -1, -1, q.shape[-1]))
        scores = torch.matmul(qa, k.transpose(-1, -2)) * self.scaling                # (B, H, A, S)
        masked = ~ok[..., None]
        if self.causal:
            masked = masked | (torch.arange(k.shape[2], device=q.device) > q_pos[rows][..., None])
        if kpm is not None:
            masked = masked | kpm[:, None, None, :]
        probs = softmax(scores.masked_fill(masked, float("-inf"))).to(v.dtype)
        if self.training and self.dropout_p > 0:
            probs = torch.nn.functional.dropout(probs, self.dropout_p)
        exact = torch.matmul(probs, v)
        keep = torch.gather(out, 2, rows[..., None].expand_as(exact))
        exact = torch.where(ok[..., None], exact, keep)
        return out.scatter(2, rows[..., None].expand_as(exact), exact)

    def _compute(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], qpm: Optional[Tensor],
                 m_prev: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Outputs of the ``T`` queries (the last ``T`` key positions) and their scores ``M``."""
        tgt_len, src_len = q.shape[2], k.shape[2]
        q_pos = torch.arange(src_len - tgt_len, src_len, device=q.device)
        m = self._sparsity(q, k, q_pos, kpm)
        if qpm is not None:
            m = m.masked_fill(qpm[:, None, :], float("-inf"))
        if self.causal:
            active = self._causal_selection(m, q_pos) if m_prev is None else self._running_active(m, m_prev, q_pos)
        else:
            u = log_count(self.factor, tgt_len)
            top = m.topk(u, dim=-1).indices
            active = torch.zeros_like(m, dtype=torch.bool).scatter(-1, top, True) & torch.isfinite(m)
        out = self._lazy(v, kpm, q_pos)
        return self._exact_rows(q, k, v, active, q_pos, kpm, out), m

    # ------------------------------------------------------------------- hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        kpm = masks.key_padding
        qpm = kpm  # self attention: padded keys are padded queries, never selected
        if masks.query_padding is not None:
            qpm = masks.query_padding if qpm is None else qpm | masks.query_padding
        out, _ = self._compute(q, k, v, kpm, qpm, None)
        return out, None

    def _attend_step(
        self,
        q: Tensor,
        k: Optional[Tensor],
        v: Optional[Tensor],
        state: Dict[str, Optional[Tensor]],
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        need_weights: bool,
        static_kv: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The key/value cache plus every past query's sparsity score (for the running top-u)."""
        bsz, tgt_len = q.shape[0], q.shape[2]
        prev_k, prev_m = state.get("prev_key"), state.get("prev_scores")
        prev_len = 0 if prev_k is None else prev_k.shape[2]
        kpm = masks.key_padding
        new_kpm = kpm  # bool; a causal attn_mask was checked and dropped by the base
        if prev_k is not None:
            new_kpm = _cat_padding(state.get("prev_key_padding_mask"), new_kpm, prev_len, tgt_len, bsz)
            k, v = torch.cat([prev_k, k], 2), torch.cat([state["prev_value"], v], 2)
        qpm = None if new_kpm is None else new_kpm[:, prev_len:]
        out, m = self._compute(q, k, v, new_kpm, qpm, prev_m)
        state["prev_key"], state["prev_value"], state["prev_key_padding_mask"] = k, v, new_kpm
        state["prev_scores"] = m if prev_m is None else torch.cat([prev_m, m], -1)
        return out, None
