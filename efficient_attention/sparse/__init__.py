"""Sparse attention functionals on per-head tensors.

Block-sparse layouts, dilated (LongNet), dynamic hash-/qk-sparse, landmark,
blockwise exact and mask attention.  The registered modules built on them live
in :mod:`efficient_attention.attentions`; drop-in entry points for users of
OpenAI's ``sparse_attention``, AttentionGrid and ``mask_attention`` are in
:mod:`efficient_attention.sparse.openai`, :mod:`.attention_grid` and
:mod:`.mask_attention_compat`.
"""
from .block_sparse import block_sparse_attention

__all__ = ["block_sparse_attention"]
