"""Hash- and qk-sparse attention against dense masked float64, in AttentionGrid's (B, N, H, D) layout."""

import pytest
import torch
from sparse_reference import dense_reference

import efficient_attention as ea
from efficient_attention.sparse.dynamic import _tile_layout


def bnhd(B, T, S, H, D, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def ref(q, k, v, allowed, scale=None):
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(dense_reference(t(q), t(k), t(v), allowed, scale))


def positions_causal(T, S):
    return torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("T,S", [(40, 40), (23, 37)])
def test_hash_matches_dense(T, S, is_causal):
    B, H, D = 2, 3, 8
    q, k, v = bnhd(B, T, S, H, D)
    g = torch.Generator().manual_seed(1)
    qb, kb = torch.randint(0, 5, (B, T, H), generator=g), torch.randint(0, 5, (B, S, H), generator=g)
    out = ea.hash_sparse_attention(q, k, v, qb, kb, causal=is_causal, block_size=8)
    allowed = qb.transpose(1, 2)[..., :, None] == kb.transpose(1, 2)[..., None, :]
    if is_causal:
        allowed = allowed & positions_causal(T, S)
    torch.testing.assert_close(out, ref(q, k, v, allowed))
    torch.testing.assert_close(
        ea.dynamic_sparse_attention(q, k, v, qb, kb, sparsity_mode="hash", causal=is_causal),
        ea.hash_sparse_attention(q, k, v, qb, kb, causal=is_causal),
    )


@pytest.mark.parametrize("is_causal", [True, False])
def test_qk_matches_dense_and_dropped_queries_are_zero(is_causal):
    B, T, S, H, D = 2, 30, 30, 3, 8
    q, k, v = bnhd(B, T, S, H, D)
    g = torch.Generator().manual_seed(2)
    qk, kk = (torch.rand(B, T, H, generator=g) < 0.6).float(), (torch.rand(B, S, H, generator=g) < 0.5).float()
    out = ea.dynamic_sparse_attention(q, k, v, qk, kk, sm_scale=0.3, sparsity_mode="qk", causal=is_causal)
    allowed = qk.bool().transpose(1, 2)[..., :, None] & kk.bool().transpose(1, 2)[..., None, :]
    if is_causal:
        allowed = allowed & positions_causal(T, S)
    torch.testing.assert_close(out, ref(q, k, v, allowed, 0.3))
    assert torch.all(out.masked_select(~qk.bool()[..., None]) == 0)


def test_gradients_match_dense():
    B, T, H, D = 1, 24, 2, 4
    q, k, v = bnhd(B, T, T, H, D, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    qb = torch.randint(0, 3, (B, T, H), generator=g)
    allowed = (qb.transpose(1, 2)[..., :, None] == qb.transpose(1, 2)[..., None, :]) & positions_causal(T, T)
    w = torch.randn(B, T, H, D, dtype=torch.float64)
    got = torch.autograd.grad((ea.hash_sparse_attention(q, k, v, qb, qb, block_size=8) * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref(q, k, v, allowed) * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_hash_work_follows_the_kept_pairs():
    # 32 buckets over 1024 positions: the tiles visited are a small fraction of all tile pairs
    g = torch.Generator().manual_seed(0)
    n, bs = 1024, 32
    qb = torch.sort(torch.randint(0, 32, (1, 1, n), generator=g), -1).values
    kb = torch.sort(torch.randint(0, 32, (1, 1, n), generator=g), -1).values
    tiles = _tile_layout(qb, kb, bs)
    assert tiles.float().mean() < 0.12  # ~2-3 tiles per row of 32 instead of 32
    same = torch.zeros(1, 1, n, dtype=torch.long)
    assert _tile_layout(same, same, bs).all()  # one bucket: every pair is kept, every tile visited


def test_bad_input():
    q, k, v = bnhd(1, 8, 8, 2, 4)
    idx = torch.zeros(1, 8, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="sparsity_mode") as err:
        ea.dynamic_sparse_attention(q, k, v, idx, idx, sparsity_mode="lsh")
    assert isinstance(err.value, KeyError)
    with pytest.raises(ValueError, match="q_bucket_idx must have shape"):
        ea.hash_sparse_attention(q, k, v, idx[:, :7], idx)
    with pytest.raises(ValueError, match="k_keep must have shape"):
        ea.qk_sparse_attention(q, k, v, idx.float(), idx[..., :1].float())
    with pytest.raises(TypeError, match="integer"):
        ea.hash_sparse_attention(q, k, v, idx.float(), idx)
    with pytest.raises(ValueError, match="only 0 and 1"):
        ea.qk_sparse_attention(q, k, v, idx.float() + 0.5, idx.float())
    with pytest.raises(ValueError, match="4-D"):
        ea.hash_sparse_attention(q[0], k, v, idx, idx)


def test_qk_gradients_match_dense():
    B, T, H, D = 1, 16, 2, 4
    q, k, v = bnhd(B, T, T, H, D, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    keep_q, keep_k = torch.rand(B, T, H, generator=g) < 0.7, torch.rand(B, T, H, generator=g) < 0.7
    allowed = keep_q.transpose(1, 2)[..., :, None] & keep_k.transpose(1, 2)[..., None, :] & positions_causal(T, T)
    w = torch.randn(B, T, H, D, dtype=torch.float64)
    got = torch.autograd.grad((ea.qk_sparse_attention(q, k, v, keep_q, keep_k) * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref(q, k, v, allowed) * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
