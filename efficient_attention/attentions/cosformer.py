"""cosFormer (Qin et al., 2022): linear attention with a cos-based re-weighting.

``s_ij = act(q_i)·act(k_j) cos(π (i - j) / 2M)``, ``out_i = Σ_j s_ij v_j / Σ_j s_ij``; the cosine
splits as ``cos·cos + sin·sin``, so it is linear attention on ``2d`` features.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import Capabilities, Pattern
from ..functional import acc_dtype, causal_linear_attention, safe_divide
from ..registry import register_attention

__all__ = ["CosformerAttention", "cosFormer"]

logger = logging.getLogger(__name__)

_ACTIVATIONS = ("relu", "elu")
_CHUNK = 64


@register_attention("cosformer", "cos_former")
class CosformerAttention(EfficientAttention):
    """cosFormer linear attention.

    Math: ``s_ij = φ(q_i)·φ(k_j) cos(π (p_i - p_j) / 2M)`` with ``φ = relu`` or
    ``1 + elu``, ``out_i = Σ_j s_ij v_j / Σ_j s_ij`` (0 when nothing is attended);
    ``p`` are positions (0-based; causal queries are the last ``T`` of ``S``).

    ``M``: ``max_len`` when set, else the longer of the query and key lengths
    of the call (the paper's choice); positions must stay below ``M``.
    Incremental decoding cannot know the final length, so it needs a fixed
    ``M``: causal decoding requires ``max_len`` (``ValueError`` otherwise), and
    ``static_kv`` cross decoding uses ``max_len`` or, if unset, ``M = S`` (the
    key length, equal to the paper's ``M`` whenever ``T <= S``; a query past
    position ``S`` then raises).  With the same ``M``, decoding equals the full
    forward exactly.

    Shapes: q ``(B, H, T, d)``, k/v ``(B, H, S, d)``.  Patterns: noncausal
    self, causal self (running sums by chunks of 64; constant-state decoding),
    noncausal cross (``static_kv`` caches ``Σ φ̂(k) vᵀ``).  ``key_padding_mask``
    honoured; an arbitrary ``attn_mask`` is not; no attention dropout (the
    paper has none).  Half inputs compute in fp32.

    Cost: O((T + S)·d²) time, O((T + S)·d + d²) memory per head.
    """

    capabilities = Capabilities(
        patterns=frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS}),
        incremental=True,
        constant_state=True,
    )
    option_help = {
        "act_fun": "feature map: 'relu' or 'elu' (1 + elu)",
        "max_len": "M of the cos re-weighting (None: the longer input length of each call; needed for causal decoding)",
    }

    def __init__(self, *args, act_fun: str = "relu", max_len: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if act_fun not in _ACTIVATIONS:
            raise ValueError(f"act_fun must be one of {_ACTIVATIONS}, got {act_fun!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
        self.act_fun = act_fun
        self.max_len = max_len
        if self.dropout_p > 0:
            logger.info("cosFormer applies no attention dropout (dropout=%s is unused)", self.dropout_p)

    # --------------------------------------------------------------- features
    def _features(self, x: Tensor, start: int, m_len: int, kpm: Optional[Tensor] = None) -> Tensor:
        """``[φ(x) cos θ, φ(x) sin θ]`` ``(B, H, L, 2d)`` with ``θ_p = π p / 2M`` for positions ``start..``."""
        x = x.to(acc_dtype(x.dtype))
        x = F.relu(x) if self.act_fun == "relu" else 1.0 + F.elu(x)
        if kpm is not None:
            x = x.masked_fill(kpm[:, None, :, None], 0.0)
        pos = torch.arange(start, start + x.shape[-2], device=x.device, dtype=x.dtype)
        theta = (math.pi / 2 / m_len) * pos
        return torch.cat([x * torch.cos(theta)[:, None], x * torch.sin(theta)[:, None]], dim=-1)

    def _check_len(self, needed: int, m_len: int) -> None:
        if needed > m_len:
            raise ValueError(
                f"cosFormer positions reach {needed} but M = {m_len}: the cos re-weighting needs every position "
                f"below M (set max_len >= {needed})"
            )

    @staticmethod
    def _sums(kf: Tensor, v: Tensor):
        return torch.matmul(kf.transpose(-1, -2), v), kf.sum(-2)

    @staticmethod
    def _read(qf: Tensor, kv: Tensor, ks: Tensor) -> Tensor:
        return safe_divide(torch.matmul(qf, kv), torch.matmul(qf, ks.unsqueeze(-1)).squeeze(-1))

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        tgt_len, src_len = q.shape[2], k.shape[2]
        m_len = self.max_len or max(tgt_len, src_len)
        self._check_len(max(tgt_len, src_len), m_len)
        v32 = v.to(acc_dtype(v.dtype))
        kf = self._features(k, 0, m_len, masks.key_padding)
        if self.causal:  # self attention: T == S, queries aligned with keys
            qf = self._features(q, 0, m_len)
            zeros_kv = qf.new_zeros(*qf.shape[:2], qf.shape[-1], v32.shape[-1])
            num, den, _, _ = causal_linear_attention(qf, kf, v32, zeros_kv, zeros_kv[..., 0], _CHUNK)
            out = safe_divide(num, den)
        else:
            out = self._read(self._features(q, 0, m_len), *self._sums(kf, v32))
        return out.to(q.dtype), None

    def _attend_step(self, q, k, v, state, masks: AttentionMasks, attn_mask, need_weights, static_kv):
        bsz, tgt_len = q.shape[0], q.shape[2]
        kpm = masks.key_padding  # bool; a causal attn_mask was checked and dropped by the base
        if static_kv:
            if "prev_key" not in state:  # prev_key = Σ φ̂(k) vᵀ, prev_value = Σ φ̂(k): the keys, summarised
                m_len = self.max_len or k.shape[2]
                self._check_len(k.shape[2], m_len)
                state["prev_key"], state["prev_value"] = self._sums(
                    self._features(k, 0, m_len, kpm), v.to(acc_dtype(v.dtype))
                )
                state["m_len"] = torch.full((bsz,), m_len, dtype=torch.long, device=q.device)
                state["q_pos"] = torch.zeros(bsz, dtype=torch.long, device=q.device)
            m_len, start = int(state["m_len"][0]), int(state["q_pos"][0])
            self._check_len(start + tgt_len, m_len)
            out = self._read(self._features(q, start, m_len), state["prev_key"], state["prev_value"])
            state["q_pos"] = state["q_pos"] + tgt_len
            return out.to(q.dtype), None
        if self.max_len is None:
            raise ValueError(
                "causal cosFormer decoding needs a fixed M for the cos re-weighting: build it with max_len "
                "(the longest sequence you will decode)"
            )
        src_len = k.shape[2]
        if src_len != tgt_len:
            raise ValueError(f"causal cosFormer decoding needs as many new keys as queries, got {src_len} and {tgt_len}")
        start = int(state["pos"][0]) if "pos" in state else 0
        self._check_len(start + src_len, self.max_len)
        v32 = v.to(acc_dtype(v.dtype))
        qf = self._features(q, start, self.max_len)
        kf = self._features(k, start, self.max_len, kpm)
        if "kv_sum" in state:
            kv, ks = state["kv_sum"], state["k_sum"]
        else:
            kv = qf.new_zeros(*qf.shape[:2], qf.shape[-1], v32.shape[-1])
            ks = kv[..., 0]
        num, den, state["kv_sum"], state["k_sum"] = causal_linear_attention(qf, kf, v32, kv, ks, _CHUNK)
        state["pos"] = torch.full((bsz,), start + src_len, dtype=torch.long, device=q.device)
        return safe_divide(num, den).to(q.dtype), None


cosFormer = CosformerAttention
