"""Block-sparse attention (OpenAI Sparse Transformer / BigBird layouts) with fairseq's interface.

``softmax(q kᵀ/√d) v`` restricted to a sparsity pattern: a named pattern of
:mod:`efficient_attention.layouts` (``all``, ``local``, ``sliding``,
``strided``, ``fixed``, ``dilated``, ``global``, ``random``, ``bigbird``) or a
user block layout tensor.  Blocks outside the pattern are never computed;
token-level patterns are exact inside the kept blocks.  Cost ``O(kept blocks ·
bs² · d)`` instead of ``O(N² d)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import layouts
from ..base import AttentionMasks, EfficientAttention, check_bool
from ..block_mask import BlockMask
from ..capabilities import SELF_PATTERNS, Capabilities
from ..registry import register_attention
from ..sparse.block_sparse import block_layout_attention

__all__ = ["BlockSparseAttention", "BigBirdAttention"]


@register_attention("block_sparse", "blocksparse", "sparse_transformer")
class BlockSparseAttention(EfficientAttention):
    """Attention on the blocks of a sparsity layout, per head or shared.

    Patterns: noncausal and causal self attention.  Key padding, grouped-query
    attention (``num_kv_heads``), incremental decoding (key/value cache; each
    step computes only the new queries' kept blocks).  A query whose pattern
    row is empty (possible with user layouts) outputs 0.  With a user layout
    ``(H or 1, nb, nb)`` tensor, sequences may be at most ``nb * block_size``
    long (shorter ones use the top-left part).
    """

    capabilities = Capabilities(
        patterns=SELF_PATTERNS, incremental=True, key_padding_mask=True, grouped_kv=True,
        backends=("kernels", "torch"),
    )
    option_help = {
        "layout": f"pattern name ({', '.join(layouts.PATTERNS)}) or a bool block layout tensor (H or 1, nb, nb)",
        "block_size": "block size of the layout (16, 32, 64 or 128 for the fast kernels)",
        "local_attn_ctx": "local / strided / fixed: band width, stride, chunk length (tokens)",
        "window": "sliding: keys each side; dilated: segment length (tokens)",
        "num_verts": "fixed: number of summary-column groups the heads rotate through",
        "vertsize": "fixed: summary width in blocks",
        "dilation": "dilated: dilation rate",
        "num_global": "global: number of leading global tokens",
        "num_window_blocks": "bigbird: band width in blocks",
        "num_global_blocks": "bigbird: leading global blocks",
        "num_random_blocks": "random / bigbird: random key blocks per query block",
        "seed": "random / bigbird: seed of the random blocks",
        "autopad": "pad sequences that are not a multiple of block_size (False: ValueError)",
    }
    num_window_blocks: int  # the pattern options, set in __init__ from pattern_kw / block_kw
    num_global_blocks: int

    def __init__(
        self,
        *args,
        layout: str = "fixed",
        block_size: int = 16,
        local_attn_ctx: int = 32,
        window: int = 32,
        num_verts: int = 1,
        vertsize: int = 1,
        dilation: int = 2,
        num_global: int = 1,
        num_window_blocks: int = 3,
        num_global_blocks: int = 1,
        num_random_blocks: int = 1,
        seed: int = 0,
        autopad: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size, self.autopad = block_size, check_bool(autopad, "autopad")
        self._user_layout: Optional[Tensor] = None
        if isinstance(layout, Tensor):
            lay = layouts.as_layout(layout)
            if lay.shape[0] not in (1, self.num_heads) or lay.shape[1] != lay.shape[2]:
                raise ValueError(f"layout tensor must be (num_heads or 1, nb, nb), got {tuple(layout.shape)}")
            self._user_layout = lay
            layout = "user"
        elif layout not in layouts.PATTERNS:
            raise ValueError(f"layout must be one of {', '.join(layouts.PATTERNS)} or a tensor, got {layout!r}")
        self.layout = layout
        self.pattern_kw = dict(
            local_attn_ctx=local_attn_ctx, window=window, num_verts=num_verts, vertsize=vertsize, dilation=dilation,
            num_global=num_global,
        )
        self.block_kw = dict(
            num_window_blocks=num_window_blocks, num_global_blocks=num_global_blocks,
            num_random_blocks=num_random_blocks, seed=seed,
        )
        for name, value in {**self.pattern_kw, **self.block_kw}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, value)
        # validate the pattern options now (the masks themselves are built per length, on first use)
        if layout in layouts.BLOCK_LEVEL_PATTERNS:
            layouts.make_layout(layout, block_size, block_size, self.num_heads, causal=self.causal, **self.block_kw)
        elif layout != "user":
            layouts.make_mask_mod(layout, heads=self.num_heads, block_size=block_size, causal=self.causal,
                                  **self.pattern_kw)
        self._masks: Dict[Tuple[int, int, str], BlockMask] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_masks"] = {}  # device tensors and tables: rebuilt on first use
        return state

    def block_mask(self, n: int, device=None, q_block_start: int = 0) -> BlockMask:
        """The :class:`BlockMask` for ``n`` positions (rows from query block ``q_block_start`` on; cached)."""
        key = (n, q_block_start, str(device))
        hit = self._masks.get(key)
        if hit is not None:
            return hit
        bs, nb = self.block_size, -(-n // self.block_size)
        if self._user_layout is not None:
            if self._user_layout.shape[1] < nb:
                raise ValueError(
                    f"sequence of {n} positions needs {nb} blocks; the layout has {self._user_layout.shape[1]}"
                )
            bm = BlockMask.from_layout(self._user_layout[:, q_block_start:nb, :nb].to(device), bs, causal=self.causal)
        elif self.layout in layouts.BLOCK_LEVEL_PATTERNS:
            bm = BlockMask.from_pattern(self.layout, n, bs, self.num_heads, causal=self.causal, device=device,
                                        q_block_start=q_block_start, **self.block_kw)
        else:
            bm = BlockMask.from_pattern(self.layout, n, bs, self.num_heads, causal=self.causal, device=device,
                                        q_block_start=q_block_start, **self.pattern_kw)
        if len(self._masks) > 8:
            self._masks.clear()
        self._masks[key] = bm
        return bm

    def full_layout(self, n: int, device=None) -> Tensor:
        """The block layout ``(H or 1, ceil(n/bs), ceil(n/bs))`` used for length ``n``."""
        return self.block_mask(n, device).layout

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        bs = self.block_size
        src_len, off = k.shape[2], masks.query_offset
        if not self.autopad and src_len % bs:
            raise ValueError(f"sequence length {src_len} is not a multiple of block_size ({bs}) and autopad=False")
        start = (off // bs) * bs  # queries are padded in front to a block boundary
        qp = F.pad(q, (0, 0, off - start, 0)) if off > start else q
        with torch.no_grad():
            bm = self.block_mask(src_len, q.device, q_block_start=start // bs)
        dropout = self.dropout_p if self.training else 0.0
        out = block_layout_attention(
            qp, k, v, bm, causal=self.causal, key_padding_mask=masks.key_padding, scale=self.scaling,
            dropout_p=dropout,
        )
        return out[:, :, off - start :], None


@register_attention("bigbird", "big_bird")
class BigBirdAttention(BlockSparseAttention):
    """BigBird (Zaheer et al., 2020): :class:`BlockSparseAttention` with the ``bigbird`` layout by default
    (a band of window blocks, global blocks and seeded random blocks)."""

    def __init__(self, *args, layout: str = "bigbird", **kwargs):
        super().__init__(*args, layout=layout, **kwargs)
