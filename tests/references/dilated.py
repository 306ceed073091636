"""Dilated attention: one softmax over the union of the branches' (segment, dilation) pairs."""

from . import reference
from .sparse_common import module_reference

SEGMENTS, RATES = (4, 8), (1, 2)


def dilated_allowed(segments, rates):
    def allowed(b, h, i, j):
        for w, r in zip(segments, rates):
            off = h % r
            if i // w == j // w and (i % w) % r == off and (j % w) % r == off:
                return True
        return False

    return allowed


@reference("dilated", options=dict(segment_lengths=SEGMENTS, dilation_rates=RATES), tgt_len=13)
def dilated_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    return module_reference(m, query, key, value, dilated_allowed(SEGMENTS, RATES), key_padding_mask)
