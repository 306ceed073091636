"""Drop-in entry points for users of other libraries (the compat layer).

Each module is named after the library whose import line it replaces, keeps that
library's names and conventions, and is built on the mechanisms below it:

* :mod:`.local_attention`: lucidrains' ``local-attention`` (``LocalAttention``, ``LocalTransformer``);
* :mod:`.openai`: OpenAI ``sparse_attention``'s ``attention_impl`` / ``blocksparse_attention_impl``;
* :mod:`.attention_grid`: AttentionGrid (``fused_landmark_attention``, ``DilatedAttention``, ...);
* :mod:`.mask_attention`: ``mask_attention_transformer``'s ``mask_attn``;
* :mod:`.fairseq`: ``@fsmha`` (CAB's drop-in for ``fairseq.modules.MultiheadAttention``).

The submodules are imported on demand (``from efficient_attention.compat import openai``); the
older paths (``efficient_attention.local_attention``, ``efficient_attention.sparse.openai``, ...)
re-export them.  See ``docs/architecture.md``.
"""
