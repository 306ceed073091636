"""mask_attention: scores / weights / output against dense float64; block masks take the block-sparse path."""

import pytest
import torch
from sparse_reference import dense_reference, rand_qkv

import efficient_attention as ea
from efficient_attention.compat.mask_attention import mask_attn
from efficient_attention.sparse import masked


def test_scores_weights_and_output_match_dense():
    q, k, v = rand_qkv(2, 3, 20, 28, 8, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 20, 28, generator=g) < 0.25
    mask[1, 4] = False  # an empty row
    scores = ea.mask_attention(q, k, mask=mask, fill=-7.0)
    full = (q @ k.transpose(-1, -2)) * 8**-0.5
    torch.testing.assert_close(scores, torch.where(mask, full, torch.full_like(full, -7.0)))
    weights = ea.mask_attention(q, k, mask=mask, return_weights=True)
    torch.testing.assert_close(
        weights, dense_reference(q, k, torch.eye(28, dtype=torch.float64).expand(2, 3, 28, 28), mask)
    )
    out = ea.mask_attention(q, k, v, mask=mask)
    want = dense_reference(q, k, v, mask)
    torch.testing.assert_close(out, want)
    assert torch.all(out[:, 1, 4] == 0)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_block_structured_masks_route_to_block_sparse(monkeypatch):
    q, k, v = rand_qkv(1, 2, 64, 96, 8)
    layout = torch.tensor([[[1, 0, 1], [0, 1, 1]], [[0, 0, 1], [1, 1, 0]]], dtype=torch.bool)
    mask = layout.repeat_interleave(32, 1).repeat_interleave(32, 2)
    assert masked.block_structure(mask)[0] == 32
    calls = []
    real = masked.kernels.block_sparse_attention
    monkeypatch.setattr(
        masked.kernels, "block_sparse_attention", lambda *a, **kw: calls.append(a[3].block_size) or real(*a, **kw)
    )
    out = ea.mask_attention(q, k, v, mask=mask)
    assert calls == [32]
    torch.testing.assert_close(out, dense_reference(q, k, v, mask))
    ragged = mask.clone()
    ragged[0, 0, 0] = False  # one entry breaks every block size: the pair path
    assert masked.block_structure(ragged) is None
    fine = torch.zeros(2, 64, 96, dtype=torch.bool)
    fine[:, :16, 16:32] = True
    assert masked.block_structure(fine)[0] == 16


def test_token_masks_run_on_block_mask_tiles(monkeypatch):
    q, k, v = rand_qkv(2, 1, 70, 90, 8)
    mask = torch.rand(2, 1, 70, 90, generator=torch.Generator().manual_seed(3)) < 0.2
    mask[0, 0, 5] = False  # a row with nothing allowed gives 0
    seen = []
    real = masked.kernels.block_sparse_attention
    monkeypatch.setattr(masked.kernels, "block_sparse_attention", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw))
    out = ea.mask_attention(q, k, v, mask=mask)
    assert len(seen) == 1 and seen[0].tiles is not None
    torch.testing.assert_close(out, dense_reference(q, k, v, mask))
    assert torch.all(out[0, 0, 5] == 0)


def test_cost_follows_allowed_entries():
    # the pair path (weights form) touches exactly the allowed (i, j): its score vector has nnz entries
    q, k, v = rand_qkv(1, 1, 50, 50, 4)
    mask = torch.rand(1, 50, 50, generator=torch.Generator().manual_seed(1)) < 0.1
    captured = {}
    real = torch.Tensor.nonzero

    def spy(self, *a, **kw):
        res = real(self, *a, **kw)
        captured["nnz"] = res[0].numel() if isinstance(res, tuple) else res.shape[0]
        return res

    torch.Tensor.nonzero = spy
    try:
        ea.mask_attention(q, k, mask=mask, return_weights=True)
    finally:
        torch.Tensor.nonzero = real
    assert captured["nnz"] == int(mask.sum())


def test_mask_attn_compat():
    q = torch.randn(2, 4, 3)
    k = torch.randn(2, 4, 3)
    m = torch.tensor(
        [
            [[1.0, 1, 1, 1], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0]],
            [[1.0, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]],
        ]
    )
    w = mask_attn(tensor1=q, tensor2=k, mask_to_attend_to=m == 0, fill=-1e6)
    want = torch.where(m == 0, q @ k.transpose(-1, -2), torch.full((2, 4, 4), -1e6))
    torch.testing.assert_close(w, want)


def test_bad_input():
    q, k, v = rand_qkv(1, 1, 4, 5, 4)
    with pytest.raises(ValueError, match="mask must end in"):
        ea.mask_attention(q, k, v, mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        ea.mask_attention(q, k, v, mask=torch.full((4, 5), 0.5))
    with pytest.raises(ValueError, match="lengths differ"):
        ea.mask_attention(q, k, v[..., :3, :], mask=torch.ones(4, 5, dtype=torch.bool))
