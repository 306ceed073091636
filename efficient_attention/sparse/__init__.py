"""Sparse attention functionals on per-head tensors.

Block-sparse layouts, dilated (LongNet), dynamic hash-/qk-sparse, landmark,
blockwise exact and mask attention.  The registered modules built on them live
in :mod:`efficient_attention.attentions`; drop-in entry points for users of
OpenAI's ``sparse_attention``, AttentionGrid and ``mask_attention`` are in
:mod:`efficient_attention.compat` (``openai``, ``attention_grid``,
``mask_attention``; see ``docs/sparse.md``).  The old paths
``efficient_attention.sparse.openai`` / ``.attention_grid`` / ``.mask_compat``
re-export them and are not imported here (the compat layer sits above this one).

Layer rule (``docs/architecture.md``): a function here computes attention on
``(B, H, N, D)`` tensors through the kernels (mechanism layer, functional form);
math that calls no kernel belongs in :mod:`efficient_attention.functional`,
masks and layouts in the core modules beside it.
"""

import warnings

from .block_sparse import block_layout_attention
from .blockwise import blockwise_attention
from .dilated import dilated_attention
from .dynamic import UnknownSparsityModeError, dynamic_sparse_attention, hash_sparse_attention, qk_sparse_attention
from .landmark import landmark_token_attention
from .masked import mask_attention

__all__ = [
    "block_layout_attention",
    "blockwise_attention",
    "dilated_attention",
    "dynamic_sparse_attention",
    "hash_sparse_attention",
    "qk_sparse_attention",
    "UnknownSparsityModeError",
    "landmark_token_attention",
    "mask_attention",
]

# Renamed so that one name means one thing: efficient_attention.kernels.block_sparse_attention / landmark_attention
# are the kernel ops (they return ``(out, lse)``).  The old names still work here, with a DeprecationWarning.
_RENAMED = {"block_sparse_attention": "block_layout_attention", "landmark_attention": "landmark_token_attention"}


def _renamed(module: str, name: str):
    """The functional once called ``name`` (with a ``DeprecationWarning``); ``AttributeError`` for other names."""
    if name not in _RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} is now {module}.{_RENAMED[name]} (efficient_attention.kernels.{name} is the "
        "kernel op, which returns (out, lse))",
        DeprecationWarning,
        stacklevel=3,
    )
    return globals()[_RENAMED[name]]


def __getattr__(name: str):
    return _renamed(__name__, name)
