"""BlockMask: construction (layout, mask_mod, every named layout), to_mask, printing, the validator,
and the kernels (C++, reference) on masks with partial blocks against a dense float64 oracle."""

import pickle

import pytest
import torch
from helpers import NO_CPP
from kernel_cases import loss_and_grads, make_qkv, padding

from efficient_attention import layouts as L
from efficient_attention.block_mask import BlockMask, as_block_mask
from efficient_attention.kernels import block_sparse_attention, choose_backend, reference

PATTERN_KW = dict(local_attn_ctx=32, window=20, dilation=3, num_global=5)


def dense_oracle(q, k, v, allowed, kpm=None):
    """float64 softmax attention over ``allowed (H or 1, T, S)``; rows that see nothing give 0."""
    q, k, v = (x.double() for x in (q, k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    keep = allowed[None].expand(q.shape[0], q.shape[1], -1, -1)
    if kpm is not None:
        keep = keep & ~kpm[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, -1)
    return p @ v, lse


def _expected(pattern, n, bs, heads, causal):
    if pattern in L.BLOCK_LEVEL_PATTERNS:
        lay = L.make_layout(pattern, n, bs, heads, causal=causal)
        dense = L.expand_layout(lay, bs, n, n)
        return dense & torch.ones(n, n, dtype=torch.bool).tril() if causal else dense
    mod = L.make_mask_mod(pattern, heads=heads, block_size=bs, causal=causal, **PATTERN_KW)
    return L.create_mask(mod, 1, heads, n, n)[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", L.PATTERNS)
def test_every_named_layout_is_exact(pattern, causal):
    n, bs, heads = 83, 16, 4
    bm = BlockMask.from_pattern(pattern, n, bs, heads, causal=causal, **PATTERN_KW)
    want = _expected(pattern, n, bs, heads, causal)
    assert torch.equal(bm.to_mask().expand_as(want), want)
    # the kept blocks are exactly the blocks holding an attended entry
    pad = torch.nn.functional.pad(want, (0, bm.shape[1] * bs - n, 0, bm.shape[0] * bs - n))
    blocks = pad.view(heads, bm.shape[0], bs, bm.shape[1], bs).any(4).any(2)
    assert torch.equal(bm.layout.expand_as(blocks), blocks)


def test_full_partial_split_and_tiles():
    # fixed with block-aligned stride and summary: block-exact, only the causal rule on the diagonal
    bm = BlockMask.from_pattern("fixed", 128, 16, 2, causal=True, local_attn_ctx=32)
    assert bm.tiles is None and bm.causal
    diag = torch.eye(8, dtype=torch.bool)
    assert torch.equal(bm.partial_blocks()[0], diag)
    assert not (bm.full_blocks() & bm.partial_blocks()).any()
    # strided is token-level: tiles, deduplicated (a handful for the whole mask)
    st = BlockMask.from_pattern("strided", 256, 16, 1, causal=True, local_attn_ctx=5)
    assert st.tiles is not None and st.tiles.shape[0] <= 6
    assert int(st.partial_blocks().sum()) == int(st.layout.sum())


def test_from_layout_and_mask_mod_agree():
    g = torch.Generator().manual_seed(0)
    lay = torch.rand(3, 4, 5, generator=g) < 0.5
    a = BlockMask.from_layout(lay, 16)
    b = BlockMask.from_mask_mod(L.layout_mask_mod(lay, 16), 3, 64, 80, 16)
    assert torch.equal(a.to_mask(64, 80), b.to_mask())
    assert b.tiles is None and torch.equal(b.layout, lay)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_mask_mod_block_sizes_and_rows(bs):
    n = 300
    mod = L.and_masks(L.causal_mask_mod, lambda b, h, i, j: (i - j) % 7 != 3)
    bm = BlockMask.from_mask_mod(mod, 2, n, n, bs)
    assert torch.equal(bm.to_mask()[0], L.create_mask(mod, 1, 1, n, n)[0, 0])
    # the last rows (decoding) equal the tail of the full mask
    start = n // bs - 1
    tail = BlockMask.from_mask_mod(mod, 2, n, n, bs, q_block_start=start)
    assert torch.equal(tail.to_mask(), bm.to_mask()[:, start * bs :])
    assert torch.equal(bm.rows(start).to_mask(), tail.to_mask())


def test_coarsen_keeps_the_token_mask():
    bm = BlockMask.from_pattern("fixed", 200, 16, 4, causal=True, local_attn_ctx=80, num_verts=2)
    for size in (32, 64):
        c = bm.coarsen(size)
        assert c.block_size == size and torch.equal(c.to_mask(200, 200), bm.to_mask(200, 200))
    with pytest.raises(ValueError, match="multiple"):
        bm.coarsen(24)


def test_printing():
    bm = BlockMask.from_pattern("fixed", 128, 16, 2, causal=True, local_attn_ctx=32)
    text = repr(bm)
    assert "sparsity=" in text and "full=" in text and "partial=" in text and "causal=True" in text
    assert "head 0:" in text and "#" in text and "+" in text
    big = BlockMask.from_layout(torch.ones(1, 100, 100, dtype=torch.bool), 16)
    assert "\n" not in repr(big)  # a summary line only


def test_pickles_without_its_tables():
    bm = BlockMask.from_pattern("strided", 64, 16, 2, causal=True, local_attn_ctx=5)
    bm.tables()
    again = pickle.loads(pickle.dumps(bm))
    assert torch.equal(again.to_mask(), bm.to_mask()) and again._tables == {}


def test_validator_names_what_is_wrong():
    bm = BlockMask.from_layout(torch.ones(2, 3, 3, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="head count"):
        as_block_mask(bm, 4, 48, 48)
    with pytest.raises(ValueError, match="shape or block_size"):
        as_block_mask(bm, 2, 70, 48)
    with pytest.raises(ValueError, match="block_size"):
        as_block_mask(bm, 2, 48, 48, block_size=32)
    with pytest.raises(ValueError, match="dtype"):
        as_block_mask(torch.ones(2, 3, 3), 2, 48, 48, block_size=16)
    with pytest.raises(ValueError, match="0/1"):
        as_block_mask(torch.full((2, 3, 3), 2), 2, 48, 48, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        BlockMask.from_layout(torch.ones(1, 1, 1, dtype=torch.bool), 0)
    with pytest.raises(TypeError, match="layout"):
        as_block_mask([[1]], 1, 16, 16, block_size=16)
    with pytest.raises(ValueError, match="tiles"):
        BlockMask(
            torch.ones(1, 2, 2, dtype=torch.bool),
            16,
            tile_index=torch.zeros(1, 2, 2, dtype=torch.int32),
            tiles=torch.ones(1, 8, 8, dtype=torch.bool),
        )


# ------------------------------------------------------------------ kernels on partial blocks
CASES = [
    ("strided", 16, True, dict(local_attn_ctx=5)),
    ("dilated", 32, False, dict(window=48, dilation=3)),
    ("sliding", 64, True, dict(window=40)),
    ("global", 16, False, dict(num_global=3)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pattern,bs,causal,kw", CASES)
def test_kernels_match_dense_with_partial_blocks(pattern, bs, causal, kw, dtype):
    T = 2 * bs + 19
    bm = BlockMask.from_pattern(pattern, T, bs, 3, causal=causal, **kw)
    assert bm.tiles is not None
    q, k, v = make_qkv(2, 3, T, T, 16, dtype, seed=bs)
    kpm = padding(2, T)
    out, lse = block_sparse_attention(q, k, v, bm, key_padding_mask=kpm)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want, want_lse = dense_oracle(*ref, bm.to_mask(), kpm)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
    for got, exp in zip(loss_and_grads(out, lse, (q, k, v)), loss_and_grads(want, want_lse, ref)):
        torch.testing.assert_close(got.double(), exp, atol=5 * tol, rtol=5 * tol)
    # the reference path computes the same
    r_out, r_lse = reference.block_sparse_attention(*ref, bm, key_padding_mask=kpm)
    torch.testing.assert_close(r_out, want)


def test_cpu_kernel_takes_block_masks():
    if NO_CPP:
        pytest.skip(NO_CPP)
    q, k, v = make_qkv(1, 2, 40, 40, 8, torch.float32)
    assert choose_backend("block_sparse", q, k, v, block_size=16) == "cpp"


def test_empty_rows_give_zero_not_nan():
    lay = torch.ones(2, 3, 3, dtype=torch.bool)
    lay[:, 1] = False  # the second query block keeps nothing
    q, k, v = make_qkv(1, 2, 48, 48, 8, torch.float32)
    for bm in (BlockMask.from_layout(lay, 16), BlockMask.from_mask_mod(L.layout_mask_mod(lay, 16), 2, 48, 48, 16)):
        out, lse = block_sparse_attention(q, k, v, bm)
        assert torch.all(out[:, :, 16:32] == 0) and torch.isneginf(lse[:, :, 16:32]).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_gradcheck_with_tiles():
    bm = BlockMask.from_pattern("strided", 21, 8, 2, causal=True, local_attn_ctx=3)
    q, k, v = make_qkv(1, 2, 21, 21, 4, torch.float64)
    kpm = torch.zeros(1, 21, dtype=torch.bool)
    kpm[0, 3] = True
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_sparse_attention(q, k, v, bm, key_padding_mask=kpm)[0], (q, k, v)
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda n: BlockMask.from_pattern("fixed", n, 16, 4, causal=True, local_attn_ctx=48, num_verts=2),
        lambda n: BlockMask.from_pattern("strided", n, 32, 2, causal=False, local_attn_ctx=20),
        lambda n: BlockMask.from_pattern("dilated", n, 16, 3, causal=True, window=24, dilation=3),
    ],
    ids=["fixed-causal", "strided", "dilated-causal"],
)
def test_crop_is_the_shorter_sequences_mask(build):
    """A token pattern depends on positions only: a longer mask cropped gives the shorter length's token mask
    (blocks cut by the end may keep entries past it: the kernels never read keys past the sequence)."""
    long = build(200)
    for n in (200, 131, 96, 5):
        cropped = long.crop(n)
        assert cropped.shape == (-(-n // long.block_size),) * 2 and cropped.q_len == cropped.kv_len == n
        assert torch.equal(*torch.broadcast_tensors(cropped.to_mask(), build(n).to_mask()))  # (heads may be shared)
        q, k, v = make_qkv(1, long.heads, n, n, 8, torch.float64, seed=n)
        got, _ = reference.block_sparse_attention(q, k, v, cropped)
        want, _ = reference.block_sparse_attention(q, k, v, build(n))
        torch.testing.assert_close(got, want)


def test_crop_needs_a_square_mask_at_most_its_length():
    bm = BlockMask.from_pattern("local", 64, 16, 1, causal=True, local_attn_ctx=16)
    with pytest.raises(ValueError, match="longer"):
        bm.crop(65)
    with pytest.raises(ValueError, match="square"):
        BlockMask.from_layout(torch.ones(1, 2, 3, dtype=torch.bool), 16).crop(8)
