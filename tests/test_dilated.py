"""Dilated attention: the exact softmax union of the branches, against dense masked float64."""

import pytest
import torch
from sparse_reference import dense_reference, rand_qkv

import efficient_attention as ea
from efficient_attention import layouts as L
from efficient_attention.sparse.dilated import dilated_attention, dilated_attention_reference

CONFIGS = [((4, 8, 16), (1, 2, 4)), ((6,), (2,)), ((5, 10), (1, 3)), ((8, 8), (1, 2))]


def union(segments, rates, is_causal, H, N):
    mod = L.or_masks(*[L.dilated_mask_mod(w, r, is_causal) for w, r in zip(segments, rates)])
    return L.create_mask(mod, 1, H, N, N)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("segments,rates", CONFIGS)
def test_matches_dense_union(segments, rates, is_causal):
    B, H, N, d = 2, 4, 29, 8
    q, k, v = rand_qkv(B, H, N, N, d, Hkv=2)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, :4] = True
    out, lse = dilated_attention(q, k, v, segments, rates, causal=is_causal, key_padding_mask=kpm, return_lse=True)
    allowed = union(segments, rates, is_causal, H, N) & ~kpm[:, None, None, :]
    torch.testing.assert_close(out, dense_reference(q, k, v, allowed))
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * d**-0.5
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1))


def test_overlapping_branches_count_keys_once():
    # (8, 1) contains every pair of (8, 2): the union is just (8, 1); a naive sum would double count
    B, H, N, d = 1, 2, 16, 4
    q, k, v = rand_qkv(B, H, N, N, d)
    both = dilated_attention(q, k, v, (8, 8), (1, 2))
    torch.testing.assert_close(both, dilated_attention(q, k, v, (8,), (1,)))


def test_gradients_match_dense_and_tail_queries():
    B, H, N, d = 1, 2, 20, 4
    q, k, v = rand_qkv(B, H, N, N, d, requires_grad=True)
    segs, rates = (4, 8), (1, 2)
    g = torch.randn(B, H, N, d, dtype=torch.float64)
    allowed = union(segs, rates, True, H, N)
    got = torch.autograd.grad((dilated_attention(q, k, v, segs, rates, causal=True) * g).sum(), (q, k, v))
    ref = torch.autograd.grad((dense_reference(q, k, v, allowed) * g).sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    tail = dilated_attention(q[:, :, 13:], k, v, segs, rates, causal=True)  # decoding-style: last queries only
    torch.testing.assert_close(tail, dense_reference(q, k, v, allowed)[:, :, 13:])


def test_unselected_queries_output_zero():
    q, k, v = rand_qkv(1, 1, 8, 8, 4)
    out = dilated_attention(q, k, v, (4,), (2,))  # head 0: offset 0 only
    assert torch.all(out[:, :, 1::2] == 0) and torch.all(out[:, :, 0::2] != 0)


def test_bad_config():
    q, k, v = rand_qkv(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="equal length"):
        dilated_attention(q, k, v, (4, 8), (1,))
    with pytest.raises(ValueError, match="exceeds"):
        dilated_attention(q, k, v, (2,), (4,))
    with pytest.raises(ValueError, match="exceeds"):  # the module checks the pair as the functional does
        ea.DilatedAttention(16, 4, segment_lengths=(2,), dilation_rates=(4,))
    m = ea.DilatedAttention(16, 4, segment_lengths="8,16", dilation_rates="1, 2")
    assert m.segment_lengths == (8, 16) and m.dilation_rates == (1, 2)


def test_missing_segment_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match="segment_lengths"):
        ea.build_attention("dilated", embed_dim=16, num_heads=2, segment_lengths=None)
    q, k, v = rand_qkv(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="dilation_rates"):
        dilated_attention(q, k, v, (4,), None)


def test_overflow_free_in_fp16():
    q, k, v = ((x * 100).half().double() for x in rand_qkv(1, 4, 70, 70, 16, dtype=torch.float64))
    want = dilated_attention(q, k, v, (8, 16), (1, 2), causal=True)
    got = dilated_attention(q.half(), k.half(), v.half(), (8, 16), (1, 2), causal=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=0.5, rtol=2e-2)
    ref = dilated_attention_reference(q.half(), k.half(), v.half(), (8, 16), (1, 2), causal=True)[0]
    assert torch.isfinite(ref).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_kernel_path_equals_the_branch_reference(is_causal):
    q, k, v = (x.requires_grad_() for x in rand_qkv(2, 4, 150, 150, 8, dtype=torch.float64))
    kpm = torch.zeros(2, 150, dtype=torch.bool)
    kpm[1, -9:] = True
    out, lse = dilated_attention(q, k, v, (32, 64), (1, 4), causal=is_causal, key_padding_mask=kpm, return_lse=True)
    r_out, r_lse = dilated_attention_reference(q, k, v, (32, 64), (1, 4), causal=is_causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(lse, r_lse)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(r_out.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_module_decoding_across_mask_blocks_equals_full():
    """Steps inside one 64-position block of the union mask share one mask (built at the block's end)."""
    from helpers import decode

    torch.manual_seed(0)
    m = ea.build_attention(
        "dilated", embed_dim=16, num_heads=4, causal=True, segment_lengths=(32, 96), dilation_rates=(1, 3)
    ).eval()
    x = torch.randn(150, 2, 16)
    full, _ = m(x, x, x, need_weights=False)
    steps, _ = decode(m, x, prefix=50)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
