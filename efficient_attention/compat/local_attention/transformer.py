"""A language model of local-attention blocks (lucidrains' ``LocalTransformer``).

``x -> token + absolute position embedding -> depth × [x + LocalMHA(LN(x)),
x + FeedForward(LN(x))] -> LN -> logits``.  Each attention is
:class:`~efficient_attention.compat.local_attention.PerHeadLocalAttention` with rotary
positions; cost O(N·window·dim) per layer.  :meth:`LocalTransformer.generate`
samples with a bounded key/value cache per layer.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...base import check_bool
from .attention import PerHeadLocalAttention

__all__ = ["LocalMHA", "FeedForward", "LocalTransformer", "top_k"]


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keep the ``ceil((1 - thres) · V)`` largest logits, the rest ``-inf``."""
    if not 0.0 <= thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {thres}")
    k = max(1, math.ceil((1 - thres) * logits.shape[-1]))
    val, ind = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ind, val)


class LocalMHA(nn.Module):
    """Multi-head local attention on ``(B, N, dim)``.

    A fused q/k/v projection, per-head LocalAttention, an output projection.
    """

    def __init__(
        self,
        *,
        dim: int,
        window_size: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        causal: bool = False,
        prenorm: bool = False,
        use_xpos: bool = False,
        xpos_scale_base: Optional[float] = None,
        exact_windowsize: bool = False,
        look_backward: int = 1,
        look_forward: Optional[int] = None,
        use_rotary_pos_emb: bool = True,
    ):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm = nn.LayerNorm(dim) if prenorm else None
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.attn_fn = PerHeadLocalAttention(
            window_size=window_size,
            causal=causal,
            look_backward=look_backward,
            look_forward=look_forward,
            dropout=dropout,
            dim=dim_head,
            autopad=True,
            exact_windowsize=exact_windowsize,
            use_rotary_pos_emb=use_rotary_pos_emb,
            use_xpos=use_xpos,
            xpos_scale_base=xpos_scale_base,
        )
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self.norm is not None:
            x = self.norm(x)
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return tuple(t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))

    def _out(self, out: Tensor) -> Tensor:
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        q, k, v = self._qkv(x)
        return self._out(self.attn_fn(q, k, v, mask=mask))

    def step(self, x: Tensor, cache: Optional[Dict[str, Tensor]] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """New positions ``x (B, T, dim)`` against this layer's bounded key/value cache."""
        q, k, v = self._qkv(x)
        out, cache = self.attn_fn.step(q, k, v, cache)
        return self._out(out), cache


class FeedForward(nn.Sequential):
    """``LN -> Linear(dim, mult·dim) -> GELU -> Dropout -> Linear(mult·dim, dim)``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(inner, dim, bias=False),
        )


class LocalTransformer(nn.Module):
    """Decoder-only (or bidirectional) transformer of local attention layers.

    Args:
        num_tokens: vocabulary size.  max_seq_len: longest input (absolute position embedding).
        dim, depth, heads, dim_head, ff_mult: sizes.
        causal: autoregressive (needed for :meth:`generate`'s cache).
        local_attn_window_size: window of every layer (each looks one window back).
        attn_dropout, ff_dropout: dropouts.  ignore_index: label ignored by the loss.
        use_xpos, xpos_scale_base: xpos decay on the rotary embedding.
        look_backward, look_forward, exact_windowsize: passed to every layer's LocalAttention.

    ``model(x (B, N) long, mask=None, return_loss=False)`` returns logits
    ``(B, N, num_tokens)``, or with ``return_loss`` the next-token cross-entropy
    of ``x[:, 1:]`` given ``x[:, :-1]``.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        dim: int,
        depth: int,
        causal: bool = True,
        local_attn_window_size: int = 512,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        ignore_index: int = -1,
        use_xpos: bool = False,
        xpos_scale_base: Optional[float] = None,
        look_backward: int = 1,
        look_forward: Optional[int] = None,
        exact_windowsize: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("num_tokens", num_tokens),
            ("max_seq_len", max_seq_len),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
            ("dim_head", dim_head),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.max_seq_len, self.causal, self.ignore_index = max_seq_len, check_bool(causal, "causal"), ignore_index
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(
                nn.ModuleList(
                    [
                        LocalMHA(
                            dim=dim,
                            dim_head=dim_head,
                            heads=heads,
                            dropout=attn_dropout,
                            causal=causal,
                            window_size=local_attn_window_size,
                            use_xpos=use_xpos,
                            xpos_scale_base=xpos_scale_base,
                            prenorm=True,
                            look_backward=look_backward,
                            look_forward=look_forward,
                            exact_windowsize=exact_windowsize,
                        ),
                        FeedForward(dim, ff_mult, ff_dropout),
                    ]
                )
            )
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens, bias=False))

    def _blocks(self) -> Iterator[Tuple[LocalMHA, nn.Module]]:
        """``(attention, feed-forward)`` of each layer (``layers.i.0`` / ``layers.i.1``, the upstream names)."""
        for layer in self.layers:
            attn, ff = cast(nn.ModuleList, layer)
            yield cast(LocalMHA, attn), ff

    def _embed(self, x: Tensor, start: int = 0) -> Tensor:
        if x.dtype != torch.long or x.dim() != 2:
            raise ValueError(f"x must be (batch, seq_len) token ids (long), got {x.dtype} {tuple(x.shape)}")
        n = x.shape[1]
        if start + n > self.max_seq_len:
            raise ValueError(f"sequence length {start + n} exceeds max_seq_len={self.max_seq_len}")
        return self.token_emb(x) + self.pos_emb(torch.arange(start, start + n, device=x.device))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_loss: bool = False) -> Tensor:
        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]
            mask = None if mask is None else mask[:, :-1]
        h = self._embed(x)
        for attn, ff in self._blocks():
            h = attn(h, mask=mask) + h
            h = ff(h) + h
        logits = self.to_logits(h)
        if not return_loss:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.ignore_index)

    def forward_step(
        self, x: Tensor, caches: Optional[List[Dict[str, Tensor]]] = None
    ) -> Tuple[Tensor, List[Dict[str, Tensor]]]:
        """Logits of new tokens ``x (B, T)`` continuing the cached prefix; returns ``(logits, caches)``."""
        if not self.causal:
            raise ValueError("forward_step (key/value cache) needs causal=True")
        start = 0 if caches is None else int(caches[0]["pos"][0].item())
        h = self._embed(x, start)
        new_caches = []
        for i, (attn, ff) in enumerate(self._blocks()):
            out, cache = attn.step(h, None if caches is None else caches[i])
            new_caches.append(cache)
            h = out + h
            h = ff(h) + h
        return self.to_logits(h), new_caches

    @torch.no_grad()
    def generate(
        self, prime: Tensor, seq_len: int, temperature: float = 1.0, filter_thres: float = 0.9, use_cache: bool = True
    ) -> Tensor:
        """Sample ``seq_len`` tokens after ``prime (B, n)``; returns ``(B, seq_len)``.

        Top-k filtering keeps ``ceil((1 - filter_thres)·V)`` logits.  With
        ``use_cache`` (causal models) each new token costs one step against the
        bounded per-layer caches; once the text outgrows ``max_seq_len`` the
        last ``max_seq_len`` tokens are re-encoded each step (as without cache).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        out, n = prime, prime.shape[1]
        caches = None
        for _ in range(seq_len):
            if use_cache and self.causal and out.shape[1] <= self.max_seq_len:
                step_in = out if caches is None else out[:, -1:]
                logits, caches = self.forward_step(step_in, caches)
            else:
                logits = self.forward(out[:, -self.max_seq_len :])
            probs = F.softmax(top_k(logits[:, -1], filter_thres) / temperature, dim=-1)
            sampled = torch.multinomial(probs, 1)
            out = torch.cat((out, sampled), dim=-1)
        return out[:, n:]
