"""Sparse attention operations with fast paths.

Public entry points (``(B, H, N, d)`` tensors; each returns ``(out, lse)``):

* :func:`sliding_window_attention` -- attention within a
  :class:`~efficient_attention.local_window.LocalWindow` band;
* :func:`block_sparse_attention` -- attention over the kept blocks of a
  per-head block layout.

Each entry dispatches to the fastest backend that supports the inputs -- the
Triton GPU kernels, the C++ CPU kernels (``_C``), else the pure-PyTorch
reference path (``reference.py``) -- and logs why it fell back
(:func:`not_supported_reasons` returns the reasons for given inputs).
"""
from .dispatch import choose_backend, landmark_not_supported_reasons, not_supported_reasons
from .landmark import landmark_attention
from .ops import block_sparse_attention, sliding_window_attention
from .reference import check_layout

__all__ = [
    "sliding_window_attention",
    "block_sparse_attention",
    "landmark_attention",
    "landmark_not_supported_reasons",
    "check_layout",
    "not_supported_reasons",
    "choose_backend",
]
