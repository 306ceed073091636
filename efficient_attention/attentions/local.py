"""Block-local (windowed) softmax attention.

Tokens are grouped in blocks of ``wsize``; a query in block ``b`` attends
(exact softmax) to the keys of blocks ``b - look_backward ... b +
look_forward`` (and, if causal, not after itself).  The rule is
:class:`~efficient_attention.local_window.LocalWindow`; the compute is
:func:`efficient_attention.kernels.sliding_window_attention` (fast paths where
available, else a PyTorch path that never copies keys per query).  Cost
O(N·span·d) time and O(N·span) score memory, span = ``wsize·(look_backward +
1 + look_forward)``.  Decoding keeps only the last ``span`` keys.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention, check_bool
from ..capabilities import Capabilities, Pattern
from ..local_window import LocalWindow, cache_len
from ..sparse.window import window_attention, window_attention_at
from ..registry import register_attention


__all__ = ["LocalAttention"]


def _zeros_mask(bsz: int, length: int, device) -> Tensor:
    return torch.zeros(bsz, length, dtype=torch.bool, device=device)


@register_attention("local", "local_attention")
class LocalAttention(EfficientAttention):
    """Block-local softmax attention (Luong et al. 2015; lucidrains' ``local-attention`` rule).

    ``out_i = softmax_{j in W(i)}(q_i·k_j/√d) v_j`` with ``W(i)`` the keys of
    blocks ``i//wsize - look_backward ... i//wsize + look_forward`` (causal:
    also ``j <= i``; ``exact_windowsize``: exactly the ``wsize·look_backward``
    keys before ``i``, ``wsize·look_forward`` after, and ``i``).  Keys outside
    the sequence never count, so any length works (``autopad=False`` demands a
    multiple of ``wsize``).  ``shared_qk``: keys are the L2-normalised query
    projections (``k_proj`` is tied to ``q_proj``) and a query may not attend
    to itself unless nothing else is visible.

    Shapes: ``(T, B, C)`` in and out.  Patterns: noncausal self, causal self,
    noncausal cross with aligned positions (``S == T``; key ``j`` sits at
    position ``j``).  Incremental decoding keeps a bounded cache of the last
    ``wsize - 1 + wsize·look_backward`` keys (constant state); ``static_kv``
    cross decoding tracks the query position.  Cost O(N·span·d).
    """

    capabilities = Capabilities(
        patterns=frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS}),
        incremental=True,
        constant_state=True,
        backends=("kernels.sliding_window_attention",),
    )
    option_help = {
        "wsize": "block (window) size: tokens are grouped in blocks of this many",
        "window_size": "alias of wsize (lucidrains' name); overrides it when given",
        "look_backward": "how many blocks before its own a query sees",
        "look_forward": "how many blocks after its own a query sees (default 0 if causal else 1; must be 0 if causal)",
        "exact_windowsize": "every query sees exactly wsize*look_backward keys before it "
                            "(and wsize*look_forward after)",
        "autopad": "accept lengths that are not a multiple of wsize (keys outside the sequence never count)",
        "shared_qk": "keys are the normalised query projections; "
                     "a query attends to itself only if nothing else is visible",
    }

    def __init__(
        self,
        *args,
        wsize: int = 15,
        window_size: Optional[int] = None,
        look_backward: int = 1,
        look_forward: Optional[int] = None,
        exact_windowsize: bool = False,
        autopad: bool = True,
        shared_qk: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        size = wsize if window_size is None else window_size
        name = "window_size" if window_size is not None else "wsize"
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
        if isinstance(look_backward, bool) or not isinstance(look_backward, int) or look_backward < 0:
            raise ValueError(f"look_backward must be a non-negative integer, got {look_backward!r}")
        if look_forward is None:
            look_forward = 0 if self.causal else 1
        if isinstance(look_forward, bool) or not isinstance(look_forward, int) or look_forward < 0:
            raise ValueError(f"look_forward must be a non-negative integer, got {look_forward!r}")
        if self.causal and look_forward > 0:
            raise ValueError(f"look_forward must be 0 with causal=True, got {look_forward}")
        if shared_qk and self.kdim != self.embed_dim:
            raise ValueError(f"shared_qk=True needs kdim == embed_dim, got kdim={self.kdim}")
        if shared_qk and self.num_kv_heads != self.num_heads:
            raise ValueError("shared_qk=True needs num_kv_heads == num_heads")
        self.wsize = self.window_size = size
        self.look_backward, self.look_forward = look_backward, look_forward
        self.exact_windowsize = check_bool(exact_windowsize, "exact_windowsize")
        self.autopad, self.shared_qk = check_bool(autopad, "autopad"), check_bool(shared_qk, "shared_qk")
        self.window = LocalWindow.from_blocks(
            size, look_backward, look_forward, causal=self.causal, exact_windowsize=self.exact_windowsize,
            exclude_self=self.shared_qk,
        )
        if self.shared_qk:
            self.k_proj = self.q_proj  # one projection for queries and keys (Reformer-style)

    # ----------------------------------------------------------------- helpers
    def _check_length(self, length: int) -> None:
        if not self.autopad and length % self.wsize != 0:
            raise ValueError(
                f"sequence length {length} is not a multiple of wsize={self.wsize}; pass autopad=True "
                f"(the default) or pad the input"
            )

    def _window_attend(self, q: Tensor, k: Tensor, v: Tensor, first_pos: int, kpm: Optional[Tensor]) -> Tensor:
        """Queries are the last ``T`` of the keys, which start at absolute position ``first_pos``."""
        if self.shared_qk:
            k = F.normalize(k, dim=-1)
        dropout = self.dropout_p if self.training else 0.0
        return window_attention_at(self.window, q, k, v, first_pos, key_padding_mask=kpm, scale=self.scaling,
                                   dropout_p=dropout)

    # ------------------------------------------------------------------- hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        tgt_len, src_len = q.shape[2], k.shape[2]
        if self.cross and src_len != tgt_len:
            raise ValueError(
                f"LocalAttention cross attention aligns query and key positions: it needs as many keys as "
                f"queries, got {tgt_len} queries and {src_len} keys"
            )
        self._check_length(src_len)
        kpm = masks.key_padding
        return self._window_attend(q, k, v, 0, kpm), None

    def _attend_step(
        self,
        q: Tensor,
        k: Optional[Tensor],
        v: Optional[Tensor],
        state: Dict[str, Any],
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        need_weights: bool,
        static_kv: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Causal: a bounded cache of the last keys; static cross: cached keys and the query position."""
        bsz, tgt_len, device = q.shape[0], q.shape[2], q.device
        pos_t = state.get("position")
        pos = int(pos_t[0].item()) if pos_t is not None else 0
        state["position"] = torch.full((bsz,), pos + tgt_len, dtype=torch.long, device=device)
        if static_kv:
            if "prev_key" not in state:
                state["prev_key"], state["prev_value"] = k, v
                state["prev_key_padding_mask"] = masks.key_padding
            k, v, kpm = state["prev_key"], state["prev_value"], state["prev_key_padding_mask"]
            prepared = self._prepare_masks(replace(masks, key_padding=kpm), attn_mask, bsz, tgt_len, k.shape[2], device)
            if pos + tgt_len > k.shape[2]:
                raise ValueError(f"LocalAttention cross decoding past the {k.shape[2]} cached keys (aligned positions)")
            kk = F.normalize(k, dim=-1) if self.shared_qk else k
            dropout = self.dropout_p if self.training else 0.0
            out = window_attention(self.window, q, kk, v, q_offset=pos, key_padding_mask=prepared.key_padding,
                                   scale=self.scaling, dropout_p=dropout)
            return out, None
        # causal self: keys at absolute positions pos - c .. pos + T - 1, front-padded to a block boundary
        assert k is not None and v is not None  # None only for cached static keys
        new_kpm = masks.key_padding  # bool; a causal attn_mask was checked and dropped by the base
        new_kpm = _zeros_mask(bsz, tgt_len, device) if new_kpm is None else new_kpm
        prev_k = state.get("prev_key")
        if prev_k is not None:  # the value and padding caches are written with it
            k, v = torch.cat([prev_k, k], dim=2), torch.cat([state["prev_value"], v], dim=2)
            new_kpm = torch.cat([state["prev_key_padding_mask"], new_kpm], dim=1)
        out = self._window_attend(q, k, v, pos - (k.shape[2] - tgt_len), new_kpm)
        start = max(k.shape[2] - cache_len(self.window), 0)
        state["prev_key"], state["prev_value"] = k[:, :, start:], v[:, :, start:]
        state["prev_key_padding_mask"] = new_kpm[:, start:]
        return out, None


