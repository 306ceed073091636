"""Layouts and mask_mods against their formulas."""

import pytest
import torch

from efficient_attention import layouts as L
from efficient_attention.local_window import LocalWindow

N = 96


def dense(mod, heads=1, n=N):
    return L.create_mask(mod, 1, heads, n, n)[0]


def grid(n=N):
    return torch.arange(n)[:, None], torch.arange(n)[None, :]


@pytest.mark.parametrize("causal", [True, False])
def test_all_and_local(causal):
    i, j = grid()
    assert torch.equal(dense(L.all_mask_mod(causal))[0], (j <= i) if causal else torch.ones(N, N, dtype=torch.bool))
    want = ((i - j) < 7) & (j <= i) if causal else (i - j).abs() < 7
    assert torch.equal(dense(L.local_mask_mod(7, causal))[0], want)


def test_sliding_is_the_local_window_rule():
    got = dense(L.sliding_window_mask_mod(5, 2))[0]
    assert torch.equal(got, ~LocalWindow.sliding(5, 2).dense_mask(N, N))
    i, j = grid()
    assert torch.equal(got, (j >= i - 5) & (j <= i + 2))


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_strided(stride):
    i, j = grid()
    assert torch.equal(dense(L.strided_mask_mod(stride))[0], ((i - j) % stride == 0) & (j <= i))
    assert torch.equal(dense(L.strided_mask_mod(stride, causal=False))[0], (i - j) % stride == 0)


def test_fixed_heads_rotate_summary_columns():
    l, c, nv = 16, 4, 2
    got = dense(L.fixed_mask_mod(l, c, nv), heads=4)
    i, j = grid()
    for h in range(4):
        g = h % nv
        want = ((j // l == i // l) | ((j % l >= l - c * (g + 1)) & (j % l < l - c * g))) & (j <= i)
        assert torch.equal(got[h], want), h
    assert not torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_fixed_block_layout_matches_openai_rule():
    # OpenAI: stride = ctx/bs blocks; head h's summary block columns idx::stride for idx in
    # reversed(range(stride)) grouped by vertsize; own stride-chunk; causal at block level
    bs, ctx, nv, vs, heads = 16, 64, 2, 2, 4
    nb = N * 2 // bs
    got = L.fixed_layout(heads, nb, ctx, bs, nv, vs)
    stride = ctx // bs
    groups = [list(range(stride - 1, -1, -1))[n * vs : (n + 1) * vs] for n in range(stride // vs)]
    for h in range(heads):
        want = torch.zeros(nb, nb, dtype=torch.bool)
        for idx in groups[h % nv]:
            want[:, idx::stride] = True
        for r in range(nb):
            want[r, (r // stride) * stride : (r // stride + 1) * stride] = True
            want[r, r + 1 :] = False
        assert torch.equal(got[h], want), h
    # the token pattern coarsens to the same blocks
    tok = L.make_layout("fixed", nb * bs, bs, heads, causal=True, local_attn_ctx=ctx, num_verts=nv, vertsize=vs)
    assert torch.equal(tok, got)


def test_dilated():
    w, r = 12, 3
    got = dense(L.dilated_mask_mod(w, r), heads=4)
    i, j = grid()
    for h in range(4):
        o = h % r
        want = (i // w == j // w) & ((i % w) % r == o) & ((j % w) % r == o)
        assert torch.equal(got[h], want)


def test_global_tokens():
    got = dense(L.global_mask_mod([0, 5]))[0]
    i, j = grid()
    g = lambda x: (x == 0) | (x == 5)  # noqa: E731
    assert torch.equal(got, g(i) | g(j))
    assert torch.equal(dense(L.global_mask_mod(2))[0], (i < 2) | (j < 2))


@pytest.mark.parametrize("bs", L.BLOCK_SIZES)
def test_coarsening_is_any_entry_of_the_block(bs):
    n = 2 * bs + 5
    mod = L.or_masks(L.local_mask_mod(bs // 2 + 1), L.strided_mask_mod(bs + 3))
    d = dense(mod, n=n)[0]
    nb = -(-n // bs)
    pad = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
    pad[:n, :n] = d
    want = pad.view(nb, bs, nb, bs).any(3).any(1)
    assert torch.equal(L.layout_from_mask_mod(mod, 1, n, n, bs, rows_per_chunk=1)[0], want)
    # and the layout covers the pattern: expand(layout) ⊇ mask
    assert torch.all(L.expand_layout(want[None], bs, n, n)[0] | ~d)


def test_random_layout_is_seeded_and_prefix_consistent():
    a = L.random_layout(3, 10, 2, seed=1, causal=True)
    assert torch.equal(a, L.random_layout(3, 10, 2, seed=1, causal=True))
    assert not torch.equal(a, L.random_layout(3, 10, 2, seed=2, causal=True))
    assert torch.equal(a[:, :6, :6], L.random_layout(3, 6, 2, seed=1, causal=True))
    assert torch.all(a.sum(-1) == torch.clamp(torch.arange(10) + 1, max=2))
    assert not torch.any(a & (torch.arange(10)[None, :] > torch.arange(10)[:, None]))
    nc = L.random_layout(2, 8, 3, seed=0)
    assert torch.all(nc.sum(-1) == 3)


def test_bigbird_contains_window_global_and_random():
    nb = 12
    lay = L.bigbird_layout(2, nb, num_window_blocks=3, num_global_blocks=1, num_random_blocks=2, seed=4)
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    assert torch.all(lay[:, (kb - qb).abs() <= 1])
    assert torch.all(lay[:, 0, :]) and torch.all(lay[:, :, 0])
    assert torch.all(lay | ~L.random_layout(2, nb, 2, 4))
    causal = L.bigbird_layout(2, nb, 3, 1, 2, seed=4, causal=True)
    assert not torch.any(causal & (kb > qb))


def test_user_layout_round_trip_and_printing():
    lay = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.uint8)
    mod = L.layout_mask_mod(lay, 4)
    d = dense(mod, n=12)[0]
    assert torch.equal(d, L.expand_layout(lay.bool(), 4)[0])
    assert torch.equal(L.layout_from_mask_mod(mod, 1, 12, 12, 4)[0], lay.bool())
    text = L.format_layout(lay)
    assert text.splitlines()[1:] == ["#.#", ".#.", "###"] and "6/9" in text


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_verts"):
        L.fixed_layout(3, 8, 64, 16, num_verts=2)
    with pytest.raises(ValueError, match="multiple of block_size"):
        L.make_layout("fixed", 128, 16, 2, local_attn_ctx=40)
    with pytest.raises(ValueError, match="0/1"):
        L.layout_mask_mod(torch.full((2, 2), 0.5), 4)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        L.layout_mask_mod(torch.ones(1, 1, 2, 2, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="unknown pattern"):
        L.make_layout("nope", 64, 16, 1)
    with pytest.raises(ValueError, match="needs n|pass n"):
        L.make_mask_mod("bigbird")
    with pytest.raises(ValueError, match="stride"):
        L.strided_mask_mod(0)
