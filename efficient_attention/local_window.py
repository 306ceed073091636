"""The local-window rule, written once.

Every local / sliding-window feature of the library (``LocalAttention``, the
per-head ``efficient_attention.compat.local_attention`` API, the kernels'
``sliding_window_attention``) uses this one rule.  This module is the rule
only (core layer, no compute); attention over a window is
:mod:`efficient_attention.sparse.window`.  It is a *band*: with
absolute positions, query ``i`` sees key ``j`` iff::

    lo(i) <= j <= hi(i)     and, if causal,  j <= i
    lo(i) = g * (i // g) - left
    hi(i) = g * (i // g) + g - 1 + right

where ``g`` is the group (block) size.  Keys outside ``[0, S)`` never count.

* Block-local attention (lucidrains / CAB ``LocalAttention``): tokens are
  grouped in blocks of ``window_size``; a query in block ``b`` sees key blocks
  ``b - look_backward ... b + look_forward``: ``g = window_size``,
  ``left = look_backward * window_size``, ``right = look_forward * window_size``.
* ``exact_windowsize=True``: every query sees exactly the ``window_size *
  look_backward`` keys before it (and ``window_size * look_forward`` after it
  when not causal), and itself: ``g = 1``.
* Token-exact sliding windows (Longformer / Mistral style): ``g = 1``,
  ``left``/``right`` = the window sizes.
* ``exclude_self=True`` additionally hides the key at the query's own
  position (``j != i``).  Shared query/key attention (Reformer-style
  ``shared_qk``) uses it; its "attend to oneself only when nothing else is
  visible" fallback is the mechanism's job (a query whose row is empty gets
  an lse of ``-inf`` from the kernels, and the mechanism substitutes its own
  value there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union, overload

import torch
from torch import Tensor

__all__ = ["LocalWindow", "cache_len"]


@dataclass(frozen=True)
class LocalWindow:
    """A band of visible keys per query (see the module docstring).

    Attributes:
        group: block size ``g`` (1 = token-exact).
        left: keys visible before the start of the query's block.
        right: keys visible after the end of the query's block.
        causal: additionally hide keys after the query.
        exclude_self: additionally hide the key at the query's own position.
    """

    group: int = 1
    left: int = 0
    right: int = 0
    causal: bool = False
    exclude_self: bool = False

    def __post_init__(self):
        for name in ("group", "left", "right"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"LocalWindow.{name} must be an int, got {value!r}")
        if self.group <= 0:
            raise ValueError(f"LocalWindow.group must be positive, got {self.group}")
        if self.left < 0 or self.right < 0:
            raise ValueError(f"LocalWindow.left/right must be >= 0, got left={self.left}, right={self.right}")
        if self.causal and self.right > 0:
            raise ValueError("a causal LocalWindow cannot look forward (right must be 0)")

    # -- constructors ---------------------------------------------------------
    @classmethod
    def from_blocks(
        cls,
        window_size: int,
        look_backward: int = 1,
        look_forward: Optional[int] = None,
        causal: bool = False,
        exact_windowsize: bool = False,
        exclude_self: bool = False,
    ) -> "LocalWindow":
        """The block-local rule of lucidrains' ``LocalAttention`` (``look_forward`` defaults to 0 if causal else 1)."""
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size <= 0:
            raise ValueError(f"window_size must be a positive integer, got {window_size!r}")
        look_forward = (0 if causal else 1) if look_forward is None else look_forward
        if look_backward < 0 or look_forward < 0:
            raise ValueError(f"look_backward / look_forward must be >= 0, got {look_backward} / {look_forward}")
        if causal and look_forward > 0:
            raise ValueError(f"look_forward must be 0 with causal=True, got {look_forward}")
        if exact_windowsize:
            return cls(1, window_size * look_backward, window_size * look_forward, causal, exclude_self)
        # right side: the rest of the query's own block (implicit in hi) plus look_forward blocks;
        # causal masking hides the part of the own block after the query.
        return cls(window_size, window_size * look_backward, window_size * look_forward, causal, exclude_self)

    @classmethod
    def sliding(cls, left: int, right: int = 0, causal: bool = False) -> "LocalWindow":
        """Token-exact window: ``left`` keys before and ``right`` keys after each query."""
        return cls(1, left, right, causal)

    # -- the rule -------------------------------------------------------------
    @overload
    def lo(self, pos: int) -> int: ...

    @overload
    def lo(self, pos: Tensor) -> Tensor: ...

    def lo(self, pos: Union[Tensor, int]) -> Union[Tensor, int]:
        """The first key position the query at ``pos`` sees (a Python int for an int: decoding steps)."""
        if isinstance(pos, int):
            return pos // self.group * self.group - self.left
        return torch.div(pos, self.group, rounding_mode="floor") * self.group - self.left

    @overload
    def hi(self, pos: int) -> int: ...

    @overload
    def hi(self, pos: Tensor) -> Tensor: ...

    def hi(self, pos: Union[Tensor, int]) -> Union[Tensor, int]:
        """The last key position the query at ``pos`` sees (a Python int for an int)."""
        if isinstance(pos, int):
            last = pos // self.group * self.group + self.group - 1 + self.right
            return min(last, pos) if self.causal else last
        hi = torch.div(pos, self.group, rounding_mode="floor") * self.group + self.group - 1 + self.right
        return torch.minimum(hi, pos) if self.causal else hi

    def chunk_span(self, first: int, chunk: int, n_chunks: int) -> int:
        """The most keys a chunk of ``chunk`` consecutive queries needs, over the ``n_chunks`` chunks starting at
        positions ``first, first + chunk, ...``: a Python int, no tensor (and no host sync).  Shifting a chunk by
        a multiple of ``group`` shifts its band by the same amount, so the chunks' spans repeat every
        ``group / gcd(chunk, group)`` chunks and those are all it looks at."""
        a, b = chunk, self.group
        while b:  # gcd (math.gcd does not trace under Dynamo with symbolic lengths)
            a, b = b, a % b
        period = self.group // a
        starts = (first + c * chunk for c in range(min(n_chunks, period)))
        return max(self.hi(s + chunk - 1) - self.lo(s) + 1 for s in starts)

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Broadcasting bool: True where the query at ``q_pos`` may see the key at ``k_pos``."""
        ok = (k_pos >= self.lo(q_pos)) & (k_pos <= self.hi(q_pos))
        return ok & (k_pos != q_pos) if self.exclude_self else ok

    def mask_mod(self) -> Callable:
        """FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend)."""

        def mod(b, h, q_idx, kv_idx):
            return self.allowed(q_idx, kv_idx)

        return mod

    def dense_mask(self, tgt_len: int, src_len: int, q_offset: int = 0, device=None) -> Tensor:
        """Bool ``(T, S)`` in the library convention: True = masked (for tests and small inputs)."""
        q = torch.arange(tgt_len, device=device).unsqueeze(1) + q_offset
        k = torch.arange(src_len, device=device).unsqueeze(0)
        return ~self.allowed(q, k)

    def __str__(self) -> str:
        kind = "causal" if self.causal else "bidirectional"
        extra = ", exclude_self" if self.exclude_self else ""
        return f"LocalWindow(group={self.group}, left={self.left}, right={self.right}, {kind}{extra})"


def cache_len(window: LocalWindow) -> int:
    """Keys before its own position that a causal query can still see: a decoder keeps this many."""
    return window.group - 1 + window.left
