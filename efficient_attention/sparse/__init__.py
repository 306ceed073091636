"""Sparse attention functionals on per-head tensors.

Block-sparse layouts, dilated (LongNet), dynamic hash-/qk-sparse, landmark,
blockwise exact and mask attention.  The registered modules built on them live
in :mod:`efficient_attention.attentions`; drop-in entry points for users of
OpenAI's ``sparse_attention``, AttentionGrid and ``mask_attention`` are in
:mod:`efficient_attention.sparse.openai`, :mod:`.attention_grid` and
:mod:`.mask_compat` (see ``docs/sparse.md``).
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
