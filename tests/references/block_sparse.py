"""Block-sparse attention with the 'fixed' pattern, written from its formula."""

from . import reference
from .sparse_common import module_reference

OPTIONS = dict(layout="fixed", block_size=4, local_attn_ctx=8, num_verts=2, vertsize=1)


@reference("block_sparse", options=OPTIONS, tgt_len=13)
def block_sparse_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    stride, width = 8, 4  # local_attn_ctx, vertsize * block_size

    def allowed(b, h, i, j):
        g = h % 2
        return j // stride == i // stride or stride - width * (g + 1) <= j % stride < stride - width * g

    return module_reference(m, query, key, value, allowed, key_padding_mask)
