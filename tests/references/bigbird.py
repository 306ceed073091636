"""BigBird: window blocks, global blocks and seeded random blocks, written from its definition."""

import torch

from . import reference
from .sparse_common import module_reference

OPTIONS = dict(block_size=4, num_window_blocks=3, num_global_blocks=1, num_random_blocks=1, seed=3)


def _random_blocks(heads, row, n_blocks, causal, seed=3, r=1):
    """The seeded random key blocks of one query-block row (``layouts.random_layout``'s rule)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + row)
    width = min(row + 1, n_blocks) if causal else n_blocks
    return torch.rand(heads, width, generator=g).topk(min(r, width), dim=-1).indices


@reference("bigbird", options=OPTIONS, tgt_len=13)
def bigbird_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    n = key.shape[0]
    nb = -(-n // 4)
    rand = [_random_blocks(m.num_heads, row, nb, m.causal) for row in range(nb)]

    def allowed(b, h, i, j):
        qb, kb = i // 4, j // 4
        band = (qb - 2 <= kb <= qb) if m.causal else abs(kb - qb) <= 1
        return band or qb < 1 or kb < 1 or kb in rand[qb][h].tolist()

    return module_reference(m, query, key, value, allowed, key_padding_mask)
