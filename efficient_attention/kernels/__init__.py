"""Sparse attention operations with fast paths.

Public entry points (``(B, H, N, d)`` tensors; each returns ``(out, lse)``):

* :func:`sliding_window_attention` -- attention within a
  :class:`~efficient_attention.local_window.LocalWindow` band;
* :func:`block_sparse_attention` -- attention over the kept blocks of a
  per-head block layout.

Each entry dispatches to the fastest backend that supports the inputs and
falls back to the pure-PyTorch reference path (``reference.py``), logging why.
"""
from .reference import block_sparse_attention, check_layout, sliding_window_attention

__all__ = ["sliding_window_attention", "block_sparse_attention", "check_layout"]
