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
from .block_sparse import block_sparse_attention
from .blockwise import blockwise_attention
from .dilated import dilated_attention
from .dynamic import UnknownSparsityModeError, dynamic_sparse_attention, hash_sparse_attention, qk_sparse_attention
from .landmark import landmark_attention
from .masked import mask_attention

__all__ = [
    "block_sparse_attention",
    "blockwise_attention",
    "dilated_attention",
    "dynamic_sparse_attention",
    "hash_sparse_attention",
    "qk_sparse_attention",
    "UnknownSparsityModeError",
    "landmark_attention",
    "mask_attention",
]
