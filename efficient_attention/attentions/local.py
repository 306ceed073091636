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

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import Capabilities, Pattern
from ..functional import sdpa_attention
from ..local_window import LocalWindow, cache_len
from ..options import AttentionOptions, nonnegative_int, option, positive_int
from ..registry import register_attention
from ..sparse.window import window_attention, window_attention_at

logger = logging.getLogger(__name__)

__all__ = ["LocalAttention"]


@dataclass(frozen=True)
class LocalOptions(AttentionOptions):
    wsize: int = positive_int(15, "block (window) size: tokens are grouped in blocks of this many")
    window_size: Optional[int] = positive_int(None, "alias of wsize (lucidrains' name); overrides it when given")
    look_backward: int = nonnegative_int(1, "how many blocks before its own a query sees")
    look_forward: Optional[int] = nonnegative_int(
        None, "how many blocks after its own a query sees (default 0 if causal else 1; must be 0 if causal)"
    )
    exact_windowsize: bool = option(
        False, "every query sees exactly wsize*look_backward keys before it (and wsize*look_forward after)"
    )
    autopad: bool = option(
        True, "accept lengths that are not a multiple of wsize (keys outside the sequence never count)"
    )
    shared_qk: bool = option(
        False, "keys are the normalised query projections; a query attends to itself only if nothing else is visible"
    )


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
    Options = LocalOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        size = self.wsize if self.window_size is None else self.window_size
        look_backward, look_forward = self.look_backward, self.look_forward
        if look_forward is None:
            look_forward = 0 if self.causal else 1
        if self.causal and look_forward > 0:
            raise ValueError(f"look_forward must be 0 with causal=True, got {look_forward}")
        if self.shared_qk and self.kdim != self.embed_dim:
            raise ValueError(f"shared_qk=True needs kdim == embed_dim, got kdim={self.kdim}")
        if self.shared_qk and self.num_kv_heads != self.num_heads:
            raise ValueError("shared_qk=True needs num_kv_heads == num_heads")
        self.wsize = self.window_size = size
        self.look_forward = look_forward
        self.window = LocalWindow.from_blocks(
            size,
            look_backward,
            look_forward,
            causal=self.causal,
            exact_windowsize=self.exact_windowsize,
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
        return window_attention_at(
            self.window, q, k, v, first_pos, key_padding_mask=kpm, scale=self.scaling, dropout_p=dropout
        )

    # ------------------------------------------------------------------- hooks
    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
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
        self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state: Dict[str, Any], masks: AttentionMasks
    ) -> Tensor:
        """Causal: the last ``cache_len`` keys (the base's window cache); static cross: the keys, aligned with
        the queries at positions ``masks.query_offset`` on."""
        pos, tgt_len = masks.query_offset, q.shape[2]
        if not self.causal:
            self._static_kv(state, k, v, masks.key_padding)
            k, v, kpm = state["prev_key"], state["prev_value"], state["prev_key_padding_mask"]
            if pos + tgt_len > k.shape[2]:
                raise ValueError(f"LocalAttention cross decoding past the {k.shape[2]} cached keys (aligned positions)")
            kk = F.normalize(k, dim=-1) if self.shared_qk else k
            dropout = self.dropout_p if self.training else 0.0
            return window_attention(
                self.window, q, kk, v, q_offset=pos, key_padding_mask=kpm, scale=self.scaling, dropout_p=dropout
            )
        # causal self: keys at absolute positions pos + T - len(k) .. pos + T - 1
        assert k is not None and v is not None  # causal decoding always brings the new queries' own keys
        k, v, kpm = self._window_cache(state, k, v, masks.key_padding, cache_len(self.window))
        if tgt_len == 1 and not self.shared_qk:  # one query sees a contiguous run of the cache: plain attention
            start = max(self.window.lo(pos) - (pos + 1 - k.shape[2]), 0)
            mask = None if kpm is None else kpm[:, None, None, start:]
            return sdpa_attention(
                q,
                k[:, :, start:],
                v[:, :, start:],
                mask,
                scale=self.scaling,
                dropout_p=self.dropout_p if self.training else 0.0,
            )
        return self._window_attend(q, k, v, pos + tgt_len - k.shape[2], kpm)
