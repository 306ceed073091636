"""Blockwise attention is exact attention: the vanilla loop with the module's weights."""

from . import reference
from .vanilla import vanilla_reference


@reference("blockwise", options=dict(q_chunk_size=4, k_chunk_size=3))
def blockwise_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    return vanilla_reference(m, query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
