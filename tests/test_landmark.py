"""Landmark attention: the grouped softmax against the paper's formula, top-k retrieval when decoding."""
import pytest
import torch

import efficient_attention as ea
from efficient_attention.sparse.landmark import landmark_positions

from helpers import decode
from references.landmark import landmark_loop
from sparse_reference import causal, dense_reference, rand_qkv


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_matches_formula(top_k):
    B, H, S, d = 2, 2, 19, 4
    q, k, v = rand_qkv(B, H, S, S, d, Hkv=1)
    is_mem = landmark_positions(S, 5)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 9] = True  # a padded landmark hides its block
    out = ea.landmark_attention(q, k, v, is_mem, block_size=4, top_k=top_k, key_padding_mask=kpm)
    want = landmark_loop(q, k, v, is_mem, top_k=top_k, key_padding_mask=kpm)
    torch.testing.assert_close(out, want)
    tail = ea.landmark_attention(q[:, :, 12:], k, v, is_mem, top_k=top_k, key_padding_mask=kpm)
    torch.testing.assert_close(tail, want[:, :, 12:])


def test_irregular_landmarks_per_batch_and_no_landmarks():
    B, H, S, d = 2, 1, 12, 4
    q, k, v = rand_qkv(B, H, S, S, d)
    is_mem = torch.zeros(B, S, dtype=torch.bool)
    is_mem[0, [2, 7]] = True
    is_mem[1, [4]] = True
    out = ea.landmark_attention(q, k, v, is_mem)
    for b in range(B):
        torch.testing.assert_close(out[b:b + 1], landmark_loop(q[b:b + 1], k[b:b + 1], v[b:b + 1], is_mem[b]))
    plain = ea.landmark_attention(q, k, v, torch.zeros(S, dtype=torch.bool))
    torch.testing.assert_close(plain, dense_reference(q, k, v, causal(S, S)))


def test_weights_sum_to_one_and_gradients_flow():
    q, k, v = rand_qkv(1, 1, 16, 16, 4, requires_grad=True)
    ones = torch.ones_like(v)
    out = ea.landmark_attention(q, k, ones, landmark_positions(16, 4))
    torch.testing.assert_close(out, torch.ones_like(out))  # v = 1: the weights sum to 1
    assert torch.autograd.gradcheck(
        lambda q, k, v: ea.landmark_attention(q, k, v, landmark_positions(8, 3), block_size=4),
        (q[:, :, :8].detach().requires_grad_(), k[:, :, :8].detach().requires_grad_(),
         v[:, :, :8].detach().requires_grad_()),
        fast_mode=True,
    )


def test_decoding_retrieves_top_k_blocks():
    torch.manual_seed(0)
    m = ea.LandmarkAttention(16, 4, causal=True, block_size=4, top_k=2).double().eval()
    x = torch.randn(27, 2, 16, dtype=torch.float64)
    full, _ = m(x, x, x, need_weights=False)
    steps, state = decode(m, x)
    torch.testing.assert_close(steps, full)
    from references import merge_and_project, project_heads
    q, k, v = project_heads(m, x, x, x)
    want = merge_and_project(m, landmark_loop(q, k, v, landmark_positions(27, 4), top_k=2))
    torch.testing.assert_close(full, want)


def test_bad_input():
    q, k, v = rand_qkv(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="is_mem must have shape"):
        ea.landmark_attention(q, k, v, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        ea.landmark_attention(q, k, v, torch.full((8,), 0.5))
    with pytest.raises(ValueError, match="top_k"):
        ea.landmark_attention(q, k, v, torch.zeros(8, dtype=torch.bool), top_k=-1)
    with pytest.raises(ValueError, match="block_size"):
        ea.LandmarkAttention(16, 4, causal=True, block_size=1)
