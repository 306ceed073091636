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
from ..functional import acc_dtype, linear_attention_step
from ..kernels.linear_attention import linear_attention
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


def _cos_sin(length: int, m_len: int, device, dtype) -> Tensor:
    """``[cos θ_i, sin θ_i]`` ``(L, 2, 1)``, ``θ_i = π i / 2M``, cached by (L, M, device, dtype) outside
    compilation and inference mode (an unpadded batch has the same table every step)."""
    cache = not (torch.compiler.is_compiling() or torch.is_inference_mode_enabled())
    key = (length, m_len, device, dtype)
    table = _TABLES.get(key) if cache else None
    if table is None:
        theta = (math.pi / 2) * torch.arange(length, device=device, dtype=dtype) / float(m_len)
        table = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1).unsqueeze(-1)
        if cache:
            if len(_TABLES) >= 64:
                _TABLES.clear()
            _TABLES[key] = table
    return table


class _Features(torch.autograd.Function):
    """``[φ(x) cos θ, φ(x) sin θ]`` ``(B, H, L, 2d)`` contiguous in ``dtype`` from ``x (B, H, L, d)`` and the
    table ``(L, 2, 1)`` of :func:`_cos_sin`: one autograd node, two kernels forward (activation, one broadcast
    product written in ``dtype``), five backward; nothing but ``x`` saved."""

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, act_fun: str, dtype: torch.dtype) -> Tensor:
        acc = acc_dtype(dtype)
        act = F.relu(x) if act_fun == "relu" else 1.0 + F.elu(x.to(acc))
        bsz, heads, length, dim = x.shape
        out = torch.empty(bsz, heads, length, 2, dim, dtype=dtype, device=x.device)
        torch.mul(act.unsqueeze(-2), table.to(acc), out=out)
        ctx.save_for_backward(x, table)
        ctx.act_fun = act_fun
        return out.view(bsz, heads, length, 2 * dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, table = ctx.saved_tensors
        bsz, heads, length, dim = x.shape
        grad_act = (grad.view(bsz, heads, length, 2, dim) * table).sum(-2)
        if ctx.act_fun == "relu":
            grad_x = grad_act.masked_fill_(x <= 0, 0.0)
        else:  # d(1 + elu)/dx = 1 for x > 0, e^x otherwise
            grad_x = torch.where(x > 0, grad_act, grad_act * torch.exp(x.to(grad_act.dtype)))
        return grad_x.to(x.dtype), None, None, None


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
    chunked kernels; constant-state decoding),
    noncausal cross (``static_kv`` caches ``Σ φ̂(k) vᵀ``).  ``key_padding_mask``
    honoured; an arbitrary ``attn_mask`` is not; no attention dropout (the
    paper has none).  Half inputs: features in fp32, rounded to the input dtype
    for the kernels, which accumulate in fp32.

    Cost: O((T + S)·d²) time, O((T + S)·d + d²) memory per head.
    """

    capabilities = Capabilities(
        patterns=frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS}),
        incremental=True,
        constant_state=True,
    )
    Options = CosformerOptions

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
        feature_dtype = dtype if self.causal else acc  # the Triton kernels take the input dtype; noncausal is fp32
        with torch.autocast(q.device.type, enabled=False):
            table = _cos_sin(max(tgt_len, src_len), m_len, q.device, acc)
            qf = _Features.apply(q, table[:tgt_len], self.act_fun, feature_dtype)
            kf = _Features.apply(k, table[:src_len], self.act_fun, feature_dtype)
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
        if tgt_len == 1 and "kv_sum" in state:  # one token: its angle is a number; the recurrence, a few kernels
            theta = (math.pi / 2) * start / self.max_len
            x = self._act(torch.cat([q, k], dim=2), None)  # the query and its key as one (B, H, 2, d): fewer ops
            feats = torch.cat([x * math.cos(theta), x * math.sin(theta)], dim=-1)
            qf, kf = feats[:, :, :1], feats[:, :, 1:]
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
