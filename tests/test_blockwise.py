"""Blockwise exact attention: equal to dense attention, gradients included; activations O(N * chunk)."""

import pytest
import torch
from helpers import TOL
from sparse_reference import rand_qkv

import efficient_attention as ea
from efficient_attention.functional import dense_attention
from efficient_attention.masks import merge_masks


def saved_bytes(fn, *args):
    """Bytes autograd keeps for the backward pass of ``fn(*args)`` (deterministic activation memory)."""
    total, seen = 0, set()

    def pack(t):  # count each storage once (views and repeated saves share memory)
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("chunks", [(4, 5), (64, 64), (1, 7)])
def test_equals_dense_fp32_with_masks_and_gradients(is_causal, chunks):
    B, H, T, S, d = 2, 4, 21, 26, 8
    q, k, v = rand_qkv(B, H, T, S, d, Hkv=2, dtype=torch.float32, requires_grad=True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, :6] = True
    attn = torch.randn(1, H, T, S) * 0.5
    out = ea.blockwise_attention(
        q, k, v, causal=is_causal, key_padding_mask=kpm, attn_mask=attn, q_chunk_size=chunks[0], k_chunk_size=chunks[1]
    )
    mask = merge_masks(T, S, key_padding_mask=kpm, attn_mask=attn, causal=is_causal)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = dense_attention(q64, k64, v64, mask.double())
    torch.testing.assert_close(out, ref.float(), **TOL[torch.float32])
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g.double()).sum(), (q64, k64, v64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), **TOL[torch.float32])


def test_gradcheck_float64_with_lse():
    q, k, v = rand_qkv(1, 2, 9, 9, 4, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ea.blockwise_attention(q, k, v, causal=True, q_chunk_size=4, k_chunk_size=3, return_lse=True),
        (q, k, v),
        fast_mode=True,
    )


def test_empty_rows_are_zero():
    q, k, v = rand_qkv(1, 1, 6, 6, 4, requires_grad=True)
    kpm = torch.zeros(1, 6, dtype=torch.bool)
    kpm[0, :3] = True
    out = ea.blockwise_attention(q, k, v, causal=True, key_padding_mask=kpm, q_chunk_size=2, k_chunk_size=2)
    assert torch.all(out[:, :, :3] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "no-kernel-backend"])
def test_activation_memory_is_linear_in_length(kernel, monkeypatch):
    """Also where no block-sparse kernel backend takes the inputs (no C++ extension): not their reference
    backend, which gathers every key block per query block (O(N^2) kept), but SDPA or the chunk loop."""
    from efficient_attention.sparse import blockwise

    if not kernel:
        monkeypatch.setattr(blockwise, "_kernel_takes", lambda *a: False)
    d, chunk = 16, 32
    sizes = {}
    for n in (256, 512):
        q, k, v = rand_qkv(1, 1, n, n, d, dtype=torch.float32, requires_grad=True)
        sizes[n] = (
            saved_bytes(lambda: ea.blockwise_attention(q, k, v, q_chunk_size=chunk, k_chunk_size=chunk)),
            saved_bytes(lambda: dense_attention(q, k, v)[0]),
        )
        q, k, v = rand_qkv(1, 1, n, n, d, dtype=torch.float32, requires_grad=True)
        sizes[n] += (saved_bytes(lambda: ea.blockwise_attention(q, k, v, q_chunk_size=chunk, dropout_p=0.1)),)
    assert sizes[512][2] / sizes[256][2] < 2.2, sizes  # the checkpointed (dropout) path keeps only its inputs
    blockwise_ratio = sizes[512][0] / sizes[256][0]
    dense_ratio = sizes[512][1] / sizes[256][1]
    assert blockwise_ratio < 2.2 and dense_ratio > 3.5, sizes
    assert sizes[512][0] < sizes[512][1] / 4


def test_dropout_path_is_checkpointed_and_reproducible():
    q, k, v = rand_qkv(1, 2, 40, 40, 8, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(5)
    a = ea.blockwise_attention(q, k, v, dropout_p=0.3, q_chunk_size=8)
    torch.manual_seed(5)
    b = ea.blockwise_attention(q, k, v, dropout_p=0.3, q_chunk_size=8)
    torch.testing.assert_close(a, b)
    a.sum().backward()  # the replayed dropout masks give a finite gradient
    assert torch.isfinite(q.grad).all()


def test_bad_options():
    q, k, v = rand_qkv(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="q_chunk_size"):
        ea.blockwise_attention(q, k, v, q_chunk_size=0)


def test_module_additive_padding_and_mask_equal_vanilla():
    torch.manual_seed(0)
    van = ea.build_attention("vanilla", embed_dim=16, num_heads=4, causal=True).double()
    blk = ea.build_attention(
        "blockwise", embed_dim=16, num_heads=4, causal=True, q_chunk_size=3, k_chunk_size=4
    ).double()
    blk.load_state_dict(van.state_dict())
    x = torch.randn(10, 2, 16, dtype=torch.float64)
    kpm = torch.randn(2, 10, dtype=torch.float64)  # finite additive key padding
    am = torch.rand(10, 10) < 0.2
    am[:, 0] = False
    for mask in (None, am):
        want, _ = van(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        got, _ = blk(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fused", [True, False])
def test_overflow_free_in_fp16(fused):
    q, k, v = ((x * 100).half().double() for x in rand_qkv(1, 2, 50, 50, 16, dtype=torch.float64))
    want = ea.blockwise_attention(q, k, v, causal=True)
    got = ea.blockwise_attention(q.half(), k.half(), v.half(), causal=True, fused=fused)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=0.5, rtol=2e-2)


def test_fused_equals_the_chunk_loop():
    q, k, v = rand_qkv(2, 2, 45, 45, 8, dtype=torch.float64)
    kpm = torch.zeros(2, 45, dtype=torch.bool)
    kpm[0, :4] = True
    for lse in (False, True):
        a = ea.blockwise_attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=lse)
        b = ea.blockwise_attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=lse, fused=False)
        torch.testing.assert_close(a, b)
