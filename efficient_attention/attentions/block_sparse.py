"""Block-sparse attention (OpenAI Sparse Transformer / BigBird layouts) with fairseq's interface.

``softmax(q kᵀ/√d) v`` restricted to a sparsity pattern: a named pattern of
:mod:`efficient_attention.layouts` (``all``, ``local``, ``sliding``,
``strided``, ``fixed``, ``dilated``, ``global``, ``random``, ``bigbird``) or a
user block layout tensor.  Blocks outside the pattern are never computed;
token-level patterns are exact inside the kept blocks.  Cost ``O(kept blocks ·
bs² · d)`` instead of ``O(N² d)``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import layouts
from ..base import AttentionMasks, EfficientAttention
from ..block_mask import BlockMask, built_outside_graph
from ..capabilities import SELF_PATTERNS, Capabilities
from ..functional import _sdpa, combine_attention
from ..kernels.ops import block_mask_attention
from ..options import AttentionOptions, nonnegative_int, option, positive_int
from ..registry import register_attention

__all__ = ["BlockSparseAttention", "BigBirdAttention"]

# a decoding step over at most this many keys is one SDPA call with its row of the block mask as an additive bias;
# a longer one runs the kernels, which skip the unkept blocks (H200, B = 4: the bias step 0.34 vs 0.95 ms at a
# 512 context, even at 8k, 5.9 vs 2.1 ms at 64k)
STEP_BIAS_MAX_KEYS = 4096


def _check_layout(value, name: str):
    if isinstance(value, Tensor) or value in layouts.PATTERNS:
        return value
    raise ValueError(f"{name} must be one of {', '.join(layouts.PATTERNS)} or a tensor, got {value!r}")


def _layout(default: str):
    return option(
        default,
        f"pattern name ({', '.join(layouts.PATTERNS)}) or a bool block layout tensor (H or 1, nb, nb)",
        choices=layouts.PATTERNS,
        check=_check_layout,
        words="a pattern name or a bool layout tensor (H or 1, nb, nb)",
    )


@dataclass(frozen=True)
class BlockSparseOptions(AttentionOptions):
    layout: str = _layout("fixed")
    block_size: int = positive_int(16, "block size of the layout (16, 32, 64 or 128 for the fast kernels)")
    local_attn_ctx: int = nonnegative_int(32, "local / strided / fixed: band width, stride, chunk length (tokens)")
    window: int = nonnegative_int(32, "sliding: keys each side; dilated: segment length (tokens)")
    num_verts: int = nonnegative_int(1, "fixed: number of summary-column groups the heads rotate through")
    vertsize: int = nonnegative_int(1, "fixed: summary width in blocks")
    dilation: int = nonnegative_int(2, "dilated: dilation rate")
    num_global: int = nonnegative_int(1, "global: number of leading global tokens")
    num_window_blocks: int = nonnegative_int(3, "bigbird: band width in blocks")
    num_global_blocks: int = nonnegative_int(1, "bigbird: leading global blocks")
    num_random_blocks: int = nonnegative_int(1, "random / bigbird: random key blocks per query block")
    seed: int = nonnegative_int(0, "random / bigbird: seed of the random blocks")
    autopad: bool = option(True, "pad sequences that are not a multiple of block_size (False: ValueError)")


@dataclass(frozen=True)
class BigBirdOptions(BlockSparseOptions):
    layout: str = _layout("bigbird")


# the options that shape a token-level pattern (layouts.make_mask_mod) and a block-level one (layouts.make_layout)
_PATTERN_OPTIONS = ("local_attn_ctx", "window", "num_verts", "vertsize", "dilation", "num_global")
_BLOCK_OPTIONS = ("num_window_blocks", "num_global_blocks", "num_random_blocks", "seed")
_CACHED_MASKS = 16  # block masks kept per module (lengths x decoding rows x devices), least recently used dropped
# The ``fixed`` pattern with layout blocks under the kernels' 64-wide tiles (the defaults: block 16, chunks of 32, a
# 16-token summary each) keeps every causal 64-tile, each masked token by token.  From SPLIT_MIN_LEN positions on,
# on CUDA, it runs as two exact parts merged by their log-sum-exp: each query's own chunk (a causal band), and the
# summary columns of the earlier chunks gathered into a compact key sequence (N * summary / chunk keys: whole
# 64-tiles, a quarter of the scores at the defaults).  Below it the step is host-bound: the second call and the
# merge's ~40 ATen ops would cost more than the saved tiles.  EA_FIXED_SPLIT=0 turns it off (for A/B timing).
SPLIT_MIN_LEN = 8192
FIXED_SPLIT = os.environ.get("EA_FIXED_SPLIT", "1") != "0"


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
        patterns=SELF_PATTERNS,
        incremental=True,
        key_padding_mask=True,
        grouped_kv=True,
        backends=("kernels", "torch"),
    )
    Options = BlockSparseOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        layout: Union[str, Tensor] = self.layout  # the option: a pattern name or a layout tensor
        block_size = self.block_size
        self._user_layout: Optional[Tensor] = None
        if isinstance(layout, Tensor):
            lay = layouts.as_layout(layout)
            if lay.shape[0] not in (1, self.num_heads) or lay.shape[1] != lay.shape[2]:
                raise ValueError(f"layout tensor must be (num_heads or 1, nb, nb), got {tuple(layout.shape)}")
            self._user_layout = lay
            layout = "user"
        self.layout: str = layout  # from here on a pattern name ("user": the tensor is in _user_layout)
        self.pattern_kw = {k: getattr(self, k) for k in _PATTERN_OPTIONS}
        self.block_kw = {k: getattr(self, k) for k in _BLOCK_OPTIONS}
        # validate the pattern options now (the masks themselves are built per length, on first use)
        if layout in layouts.BLOCK_LEVEL_PATTERNS:
            layouts.make_layout(layout, block_size, block_size, self.num_heads, causal=self.causal, **self.block_kw)
        elif layout != "user":
            layouts.make_mask_mod(
                layout, heads=self.num_heads, block_size=block_size, causal=self.causal, **self.pattern_kw
            )
        self._masks: "OrderedDict[Tuple[int, int, Any], BlockMask]" = OrderedDict()
        self._splits: "dict[Tuple[int, Any], Tuple[BlockMask, BlockMask, Tensor]]" = {}  # see SPLIT_MIN_LEN

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_masks"] = OrderedDict()  # device tensors and tables: rebuilt on first use
        state.pop("_step_rows", None)  # (the decoding step's, likewise)
        state["_splits"] = {}
        return state

    @built_outside_graph
    def block_mask(self, n: int, device=None, q_block_start: int = 0) -> BlockMask:
        """The :class:`BlockMask` for ``n`` positions (rows from query block ``q_block_start`` on).

        Built once per ``(n, q_block_start, device)`` on that device (the most recently used are kept): a
        training step at a length seen before does no mask work, no host-device copy and no synchronisation.
        A token pattern at a length below one already built is that mask cropped (:meth:`BlockMask.crop`:
        a few device ops, no evaluation of the pattern, no synchronisation)."""
        key = (n, q_block_start, device)
        hit = self._masks.get(key)
        if hit is not None:
            self._masks.move_to_end(key)
            return hit
        longer = [
            m for (n2, start, dev), m in self._masks.items() if start == 0 and dev == device and n2 >= n
        ]  # a token pattern's mask depends on positions only: a longer sequence's mask, cropped, is this one's
        if (
            q_block_start == 0
            and longer
            and self._user_layout is None
            and self.layout not in layouts.BLOCK_LEVEL_PATTERNS
        ):
            bm = min(longer, key=lambda m: m.shape[0]).crop(n)
        else:
            with torch.no_grad():
                bm = self._build_block_mask(n, device, q_block_start)
            if self.causal:
                bm = bm.with_causal()  # (every causal pattern has the rule already; a user layout gets it here)
        if len(self._masks) >= _CACHED_MASKS:
            self._masks.popitem(last=False)  # the least recently used
        self._masks[key] = bm
        return bm

    def _build_block_mask(self, n: int, device, q_block_start: int) -> BlockMask:
        bs, nb = self.block_size, -(-n // self.block_size)
        if self._user_layout is not None:
            if self._user_layout.shape[1] < nb:
                raise ValueError(
                    f"sequence of {n} positions needs {nb} blocks; the layout has {self._user_layout.shape[1]}"
                )
            return BlockMask.from_layout(self._user_layout[:, q_block_start:nb, :nb].to(device), bs, causal=self.causal)
        kw = self.block_kw if self.layout in layouts.BLOCK_LEVEL_PATTERNS else self.pattern_kw
        return BlockMask.from_pattern(
            self.layout, n, bs, self.num_heads, causal=self.causal, device=device, q_block_start=q_block_start, **kw
        )

    def full_layout(self, n: int, device=None) -> Tensor:
        """The block layout ``(H or 1, ceil(n/bs), ceil(n/bs))`` used for length ``n``."""
        return self.block_mask(n, device).layout

    @built_outside_graph
    def _split_masks(self, n: int, device) -> Optional[Tuple[BlockMask, BlockMask, Tensor]]:
        """``(own chunk mask, summary mask, summary positions)`` of the ``fixed`` pattern at ``n`` positions,
        or None where the pattern does not split (see ``SPLIT_MIN_LEN``); built once per length and device."""
        l, c = self.local_attn_ctx, self.vertsize * self.block_size
        if self.layout != "fixed" or not self.causal or self.num_verts != 1 or 2 * c > l or l % c:
            return None
        key = (n, device)
        hit = self._splits.get(key)
        if hit is None:
            nc = -(-n // l) * c  # summary keys of every chunk (the last one's: past n or not)

            def own(b, h, i, j):  # the query's chunk, causal
                return (torch.div(j, l, rounding_mode="floor") == torch.div(i, l, rounding_mode="floor")) & (j <= i)

            def summary(b, h, i, j):  # compact key j: summary column j % c of chunk j // c; earlier chunks only
                return torch.div(j, c, rounding_mode="floor") < torch.div(i, l, rounding_mode="floor")

            with torch.no_grad():
                pos = torch.arange(nc, device=device)
                pos = torch.div(pos, c, rounding_mode="floor") * l + (l - c) + torch.remainder(pos, c)
                pos = pos[pos < n]
                hit = (
                    BlockMask.from_mask_mod(own, 1, n, n, 64, device=device).with_causal(),
                    BlockMask.from_mask_mod(summary, 1, n, pos.numel(), 64, device=device),
                    pos,
                )
            if len(self._splits) >= _CACHED_MASKS:
                self._splits.clear()
            self._splits[key] = hit
        return hit

    def _attend_split(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], split) -> Tensor:
        """The ``fixed`` pattern as its own-chunk part and its summary part, merged exactly (``combine_attention``)."""
        own_bm, sum_bm, pos = split
        o1, l1 = block_mask_attention(q, k, v, own_bm, key_padding_mask=kpm, scale=self.scaling)
        ks, vs = k.index_select(2, pos), v.index_select(2, pos)
        kpm_s = None if kpm is None else kpm.index_select(1, pos)
        o2, l2 = block_mask_attention(q, ks, vs, sum_bm, key_padding_mask=kpm_s, scale=self.scaling)
        return combine_attention([o1, o2], [l1, l2])[0]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        bs = self.block_size
        src_len, off = k.shape[2], masks.query_offset
        if not self.autopad and src_len % bs:
            raise ValueError(f"sequence length {src_len} is not a multiple of block_size ({bs}) and autopad=False")
        if (
            FIXED_SPLIT
            and not off
            and q.shape[2] == src_len >= SPLIT_MIN_LEN
            and q.is_cuda
            and bs < 64
            and not (self.training and self.dropout_p)
        ):
            split = self._split_masks(src_len, q.device)
            if split is not None:
                return self._attend_split(q, k, v, masks.key_padding, split), None
        start = (off // bs) * bs  # queries are padded in front to a block boundary
        # decoding (queries after a cached prefix): the rows of the query blocks at the length rounded up to
        # a whole block, so the steps inside one block share one mask (kept blocks, tiles and kernel tables)
        n = -(-src_len // bs) * bs if off else src_len
        dropout = self.dropout_p if self.training else 0.0
        if q.shape[2] == 1 and off and n <= STEP_BIAS_MAX_KEYS and masks.key_padding is None and not dropout:
            bias = self._step_bias(n, start, q.device, q.dtype)
            if bias is not None:
                return self._one_query(q, k, v, bias[:, :, off - start : off - start + 1, :src_len]), None
        qp = F.pad(q, (0, 0, off - start, 0)) if off > start else q
        bm = self.block_mask(n, q.device, q_block_start=start // bs)
        # the mask was built for exactly these lengths and the inputs were checked by forward(): straight to
        # the kernels' dispatch (the host work of a training step is the launches)
        out, _ = block_mask_attention(
            qp, k, v, bm, key_padding_mask=masks.key_padding, scale=self.scaling, dropout_p=dropout
        )
        return (out[:, :, off - start :] if off > start else out), None

    def _step_bias(self, n: int, start: int, device, dtype: torch.dtype) -> Optional[Tensor]:
        """The decoding steps' additive mask ``(1, Hm, bs, n)`` (0 kept, ``-inf`` not) of query positions
        ``start .. start + bs - 1`` over ``n`` keys, from the rows of :meth:`block_mask`: built once per block
        of steps (the last one kept); ``None`` when one of its rows keeps no key (the kernels give such a row
        0, a softmax would give NaN)."""
        key = (n, start, device, dtype)
        hit = self.__dict__.get("_step_rows")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                keep = self.block_mask(n, device, q_block_start=start // self.block_size).to_mask(self.block_size, n)
                bias = None
                if bool(keep.any(-1).all()):
                    bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
                    bias = bias.unsqueeze(0)
            hit = self.__dict__["_step_rows"] = (key, bias)
        return hit[1]

    def _one_query(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """One new query over the cached keys: fused SDPA with its row of the step mask (``bias (1, Hm, 1, S)``),
        which launches one kernel where the block-sparse kernels' dispatch and tables cost several (a decoding
        step is host-bound); the same attention over the same kept keys."""
        return _sdpa(q, k, v, attn_mask=bias, scale=self.scaling, enable_gqa=k.shape[1] != q.shape[1])


@register_attention("bigbird", "big_bird")
class BigBirdAttention(BlockSparseAttention):
    """BigBird (Zaheer et al., 2020): :class:`BlockSparseAttention` with the ``bigbird`` layout by default
    (a band of window blocks, global blocks and seeded random blocks)."""

    Options = BigBirdOptions
