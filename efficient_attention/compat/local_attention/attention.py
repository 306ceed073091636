"""lucidrains-style local attention on per-head tensors.

``PerHeadLocalAttention(window_size, causal, look_backward, look_forward, ...)``
(also exported as ``LocalAttention``, lucidrains' name) called as
``attn(q, k, v, mask=None)`` on ``(..., N, D)`` tensors (``(B, H, N, D)``,
``(B, N, D)``, ...).  The window rule is
:class:`~efficient_attention.local_window.LocalWindow` and the compute is
:func:`efficient_attention.sparse.window.window_attention` on the kernels'
``sliding_window_attention``, shared with the registered
:class:`efficient_attention.LocalAttention`.  Cost O(N·span·D).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...base import check_bool
from ...local_window import LocalWindow, cache_len
from ...sparse.window import window_attention, window_attention_at
from .rotary import RotaryEmbedding

__all__ = ["PerHeadLocalAttention", "LocalAttention"]


def _int_option(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class PerHeadLocalAttention(nn.Module):
    """Block-local softmax attention on per-head tensors (the ``local-attention`` API).

    Tokens are grouped in windows of ``window_size``; a query in window ``b``
    attends to the keys of windows ``b - look_backward ... b + look_forward``
    (causal: and not after itself; ``exact_windowsize``: exactly the
    ``window_size·look_backward`` keys before it, and ``window_size·look_forward``
    after).  Keys outside the sequence never count.

    Args:
        window_size: window (block) size.
        causal: autoregressive masking.
        look_backward / look_forward: windows seen before / after (``look_forward``
            defaults to 0 if causal else 1).
        dropout: dropout on the attention probabilities (training only).
        shared_qk: ``q`` and ``k`` are one tensor: keys are L2-normalised and a
            query attends to itself only when nothing else is visible.
        rel_pos_emb_config: legacy form of ``dim`` (its first element).
        dim: head dimension to rotate; with ``use_rotary_pos_emb`` (default) it
            switches on rotary position embeddings (xpos decay with ``use_xpos``).
        autopad: accept lengths that are not a multiple of ``window_size`` (no
            copy is made: the band simply ends at the sequence end).  Without it
            such a length raises ``ValueError``.
        scale: logit scale (default ``D ** -0.5``).

    Forward: ``q, k (..., N, D)``, ``v (..., N, Dv)``, ``mask (b, N)`` bool with
    **True = keep** (lucidrains' convention), ``b`` dividing the product of the
    leading dims (``(B, N)`` for ``(B, H, N, D)`` inputs, ``(1, N)`` to share
    one mask); ``input_mask=`` is accepted as another name for it, as in
    lucidrains' library.  Returns ``(..., N, Dv)``.
    """

    def __init__(
        self,
        window_size: int,
        causal: bool = False,
        look_backward: int = 1,
        look_forward: Optional[int] = None,
        dropout: float = 0.0,
        shared_qk: bool = False,
        rel_pos_emb_config: Optional[Sequence[int]] = None,
        dim: Optional[int] = None,
        autopad: bool = False,
        exact_windowsize: bool = False,
        scale: Optional[float] = None,
        use_rotary_pos_emb: bool = True,
        use_xpos: bool = False,
        xpos_scale_base: Optional[float] = None,
    ):
        super().__init__()
        _int_option(window_size, "window_size", 1)
        causal = check_bool(causal, "causal")
        _int_option(look_backward, "look_backward", 0)
        look_forward = (0 if causal else 1) if look_forward is None else _int_option(look_forward, "look_forward", 0)
        if causal and look_forward > 0:
            raise ValueError(f"look_forward must be 0 with causal=True, got {look_forward}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.window_size, self.causal = window_size, causal
        self.look_backward, self.look_forward = look_backward, look_forward
        self.dropout, self.shared_qk, self.autopad = (
            float(dropout),
            check_bool(shared_qk, "shared_qk"),
            check_bool(autopad, "autopad"),
        )
        self.exact_windowsize, self.scale = check_bool(exact_windowsize, "exact_windowsize"), scale
        self.window = LocalWindow.from_blocks(
            window_size,
            look_backward,
            look_forward,
            causal=self.causal,
            exact_windowsize=self.exact_windowsize,
            exclude_self=self.shared_qk,
        )
        if rel_pos_emb_config is not None:
            dim = rel_pos_emb_config[0]
        if use_xpos and not (dim is not None and use_rotary_pos_emb):
            raise ValueError("use_xpos=True needs dim (rotary dimension) and use_rotary_pos_emb=True")
        self.rel_pos = (
            RotaryEmbedding(dim, use_xpos, xpos_scale_base) if dim is not None and use_rotary_pos_emb else None
        )

    def extra_repr(self) -> str:
        return (
            f"window_size={self.window_size}, causal={self.causal}, look_backward={self.look_backward}, "
            f"look_forward={self.look_forward}, shared_qk={self.shared_qk}, exact_windowsize={self.exact_windowsize}"
        )

    # ------------------------------------------------------------------ checks
    def _check(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
            if x.dim() < 2:
                raise ValueError(f"{name} must be (..., seq_len, dim), got shape {tuple(x.shape)}")
        if q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
            raise ValueError(
                f"q, k and v must agree in shape (..., N, D): q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)}"
            )
        if self.rel_pos is not None and q.shape[-1] < self.rel_pos.dim:
            raise ValueError(f"dim={self.rel_pos.dim} (rotary) exceeds the head dimension {q.shape[-1]}")
        n = q.shape[-2]
        if not self.autopad and n % self.window_size != 0:
            raise ValueError(
                f"sequence length {n} is not a multiple of window_size={self.window_size}; "
                f"pass autopad=True or pad the input"
            )

    def _padding(self, mask: Optional[Tensor], packed: int, n: int) -> Optional[Tensor]:
        """lucidrains mask ``(b, N)`` True = keep -> key padding ``(packed, N)`` True = pad."""
        if mask is None:
            return None
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = keep), got {mask.dtype}")
        if mask.dim() != 2 or mask.shape[1] != n or packed % mask.shape[0] != 0:
            raise ValueError(
                f"mask must be (b, {n}) with b dividing the {packed} leading rows of q, got {tuple(mask.shape)}"
            )
        return (~mask).repeat_interleave(packed // mask.shape[0], dim=0)

    def _scale(self, d: int) -> float:
        return d**-0.5 if self.scale is None else self.scale

    # ----------------------------------------------------------------- forward
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, *, input_mask: Optional[Tensor] = None
    ) -> Tensor:
        if input_mask is not None:  # lucidrains' other name for the same mask
            if mask is not None:
                raise ValueError("pass the padding mask as mask= or input_mask=, not both")
            mask = input_mask
        self._check(q, k, v)
        lead, n, d = q.shape[:-2], q.shape[-2], q.shape[-1]
        packed = math.prod(lead)
        kpm = self._padding(mask, packed, n)
        q4, k4, v4 = (x.reshape(packed, 1, n, x.shape[-1]) for x in (q, k, v))
        if self.shared_qk:
            k4 = F.normalize(k4, dim=-1)
        if self.rel_pos is not None:
            q4, k4 = self.rel_pos(q4, k4, torch.arange(n, device=q.device), center=n // 2)
        out = window_attention(
            self.window,
            q4,
            k4,
            v4,
            key_padding_mask=kpm,
            scale=self._scale(d),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return out.reshape(*lead, n, v.shape[-1])

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, cache: Optional[Dict[str, Tensor]] = None
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Causal decoding: ``T`` new positions ``(B, H, T, D)`` against a bounded cache.

        ``cache`` holds the last ``window_size - 1 + window_size·look_backward``
        (rotated) keys and values and the position; returns ``(out, new cache)``.
        The outputs equal :meth:`forward` on the whole sequence.
        """
        if not self.causal:
            raise ValueError("step() (incremental decoding) needs causal=True")
        if q.dim() != 4 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
            raise ValueError(
                f"step() takes q, k, v of shape (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        pos = 0 if cache is None else int(cache["pos"][0].item())
        tgt = q.shape[2]
        if self.shared_qk:
            k = F.normalize(k, dim=-1)
        if self.rel_pos is not None:
            q, k = self.rel_pos(q, k, torch.arange(pos, pos + tgt, device=q.device))
        if cache is not None:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        out = window_attention_at(
            self.window,
            q,
            k,
            v,
            pos + tgt - k.shape[2],
            scale=self._scale(q.shape[-1]),
            dropout_p=self.dropout if self.training else 0.0,
        )
        start = max(k.shape[2] - cache_len(self.window), 0)
        new_pos = torch.full((q.shape[0],), pos + tgt, dtype=torch.long, device=q.device)
        return out, {"k": k[:, :, start:], "v": v[:, :, start:], "pos": new_pos}


LocalAttention = PerHeadLocalAttention  # lucidrains' name (the compat API needs it)
