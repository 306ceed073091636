"""Sparse attention operations with fast paths.

Public entry points (``(B, H, N, d)`` tensors):

* :func:`sliding_window_attention` -- attention within a
  :class:`~efficient_attention.local_window.LocalWindow` band, ``(out, lse)``;
* :func:`block_sparse_attention` -- attention over a
  :class:`~efficient_attention.block_mask.BlockMask` (kept blocks of a per-head
  layout, full or with a token rule inside), or a plain block layout, ``(out, lse)``;
* :func:`linear_attention` -- (causal) linear attention with an optional per-position
  decay, initial and final states (``linear_attention.py``; the linear family's engine);
* :func:`landmark_attention` -- landmark attention block by block, ``(out, lse)``.

Each entry runs on the fastest backend that supports the inputs -- the Triton GPU
kernels, the C++ CPU kernels (``_C``), else a PyTorch path -- and logs at WARNING, once,
why it fell back; ``backend="triton" | "cpp" | "reference"`` (``"chunked"`` for linear
attention) forces one, and raises :class:`BackendUnavailableError` with every reason when it
cannot run.  Backends are classes (``backends.py``) listed per op by a :class:`Dispatcher`
(``dispatch.py``); :func:`not_supported_reasons` returns their reasons for given inputs.
"""

from ..block_mask import BlockMask, as_block_mask
from .backends import BackendUnavailableError
from .dispatch import Dispatcher, choose_backend, dispatchers, landmark_not_supported_reasons, not_supported_reasons
from .landmark import landmark_attention
from .linear_attention import linear_attention
from .ops import block_sparse_attention, check_inputs, sliding_window_attention

__all__ = [
    "sliding_window_attention",
    "block_sparse_attention",
    "linear_attention",
    "BlockMask",
    "as_block_mask",
    "check_inputs",
    "landmark_attention",
    "landmark_not_supported_reasons",
    "not_supported_reasons",
    "choose_backend",
    "dispatchers",
    "Dispatcher",
    "BackendUnavailableError",
]
