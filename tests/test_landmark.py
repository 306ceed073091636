"""Landmark attention: the grouped softmax against the paper's formula, top-k retrieval when decoding."""

import pytest
import torch
from helpers import decode
from references.landmark import landmark_loop
from sparse_reference import causal, dense_reference, rand_qkv

import efficient_attention as ea
from efficient_attention.sparse.landmark import landmark_attention_formula, landmark_positions


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_matches_formula(top_k):
    B, H, S, d = 2, 2, 19, 4
    q, k, v = rand_qkv(B, H, S, S, d, Hkv=1)
    is_mem = landmark_positions(S, 5)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 9] = True  # a padded landmark hides its block
    out = ea.landmark_token_attention(q, k, v, is_mem, block_size=4, top_k=top_k, key_padding_mask=kpm)
    want = landmark_loop(q, k, v, is_mem, top_k=top_k, key_padding_mask=kpm)
    torch.testing.assert_close(out, want)
    tail = ea.landmark_token_attention(q[:, :, 12:], k, v, is_mem, top_k=top_k, key_padding_mask=kpm)
    torch.testing.assert_close(tail, want[:, :, 12:])


def test_fixed_period_runs_block_by_block(monkeypatch):
    """A fixed-period is_mem without top_k takes the O(N) path; anything else the formula."""
    from efficient_attention.sparse import landmark as sl

    assert sl._fixed_period(landmark_positions(20, 5)[None]) == 5
    assert sl._fixed_period(landmark_positions(3, 5)[None]) is None  # no landmark
    irregular = landmark_positions(20, 5)
    irregular[7] = True
    assert sl._fixed_period(irregular[None]) is None
    assert sl._fixed_period(torch.stack([landmark_positions(20, 5), landmark_positions(20, 4)])) is None
    calls = []
    monkeypatch.setattr(sl, "landmark_attention_formula", lambda *a, **kw: calls.append(1))
    q, k, v = rand_qkv(1, 2, 20, 20, 4)
    ea.landmark_token_attention(q, k, v, landmark_positions(20, 5))
    assert calls == []
    ea.landmark_token_attention(q, k, v, irregular)
    ea.landmark_token_attention(q, k, v, landmark_positions(20, 5), top_k=1)
    assert calls == [1, 1]


def test_irregular_landmarks_per_batch_and_no_landmarks():
    B, H, S, d = 2, 1, 12, 4
    q, k, v = rand_qkv(B, H, S, S, d)
    is_mem = torch.zeros(B, S, dtype=torch.bool)
    is_mem[0, [2, 7]] = True
    is_mem[1, [4]] = True
    out = ea.landmark_token_attention(q, k, v, is_mem)
    for b in range(B):
        torch.testing.assert_close(out[b : b + 1], landmark_loop(q[b : b + 1], k[b : b + 1], v[b : b + 1], is_mem[b]))
    plain = ea.landmark_token_attention(q, k, v, torch.zeros(S, dtype=torch.bool))
    torch.testing.assert_close(plain, dense_reference(q, k, v, causal(S, S)))


def test_weights_sum_to_one_and_gradients_flow():
    q, k, v = rand_qkv(1, 1, 16, 16, 4, requires_grad=True)
    ones = torch.ones_like(v)
    out = ea.landmark_token_attention(q, k, ones, landmark_positions(16, 4))
    torch.testing.assert_close(out, torch.ones_like(out))  # v = 1: the weights sum to 1
    assert torch.autograd.gradcheck(
        lambda q, k, v: ea.landmark_token_attention(q, k, v, landmark_positions(8, 3), block_size=4),
        (
            q[:, :, :8].detach().requires_grad_(),
            k[:, :, :8].detach().requires_grad_(),
            v[:, :, :8].detach().requires_grad_(),
        ),
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
        ea.landmark_token_attention(q, k, v, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        ea.landmark_token_attention(q, k, v, torch.full((8,), 0.5))
    with pytest.raises(ValueError, match="top_k"):
        ea.landmark_token_attention(q, k, v, torch.zeros(8, dtype=torch.bool), top_k=-1)
    with pytest.raises(ValueError, match="block_size"):
        ea.LandmarkAttention(16, 4, causal=True, block_size=1)


# -- the block-by-block path (efficient_attention.kernels.landmark) -------------------------------------------
from efficient_attention.kernels import landmark_attention as landmark_blocks  # noqa: E402
from efficient_attention.kernels import landmark_not_supported_reasons  # noqa: E402
from efficient_attention.kernels._loader import cpu_extension  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# relative error bounds ||x - ref|| / ||ref|| per input dtype
REL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _rel(got, ref):
    got, ref = got.double(), ref.double().to(got.device)
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _padding(B, S, bs):
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, :2] = True  # left padding: the first rows of item 0 see nothing
    kpm[-1, -3:] = True  # right padding
    kpm[-1, 2 * bs - 1] = True  # a padded landmark hides its block
    return kpm


# (B, H, Hkv, T, S, block_size, padding): whole blocks, a ragged last block, the last T of S positions,
# one decoding step, grouped-query heads
BLOCK_CASES = [
    (2, 2, 2, 19, 19, 4, True),
    (2, 4, 2, 23, 23, 5, False),
    (1, 2, 1, 9, 26, 4, True),
    (2, 2, 2, 1, 17, 4, True),
    (1, 1, 1, 40, 40, 16, True),
]


@pytest.mark.parametrize("backend", [None, "reference"], ids=["fastest", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_blocks_match_formula(case, dtype, device, backend):
    """Every backend (the fastest for the device: C++ on the CPU where built, Triton on CUDA) against the
    formula, values and gradients."""
    B, H, Hkv, T, S, bs, pad = case
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in rand_qkv(B, H, T, S, 8, Hkv=Hkv))
    kpm = _padding(B, S, bs).to(device) if pad else None
    out, lse = landmark_blocks(q, k, v, bs, key_padding_mask=kpm, backend=backend)
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref_kpm = None if kpm is None else kpm.cpu()
    ref = landmark_attention_formula(*ref_in, landmark_positions(S, bs), key_padding_mask=ref_kpm)
    torch.testing.assert_close(ref, landmark_loop(*ref_in, landmark_positions(S, bs), key_padding_mask=ref_kpm))
    assert out.dtype == dtype and lse.dtype in (torch.float32, torch.float64)
    assert _rel(out, ref) < REL[dtype]
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out.double().cpu() * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), ref_in)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < 3 * REL[dtype]


def test_blocks_lse_and_empty_rows():
    """lse is the log of the grouped softmax's normaliser; rows that see nothing give 0 and -inf, finite grads."""
    B, H, S, bs = 2, 2, 14, 4
    q, k, v = rand_qkv(B, H, S, S, 4, requires_grad=True)
    kpm = _padding(B, S, bs)
    out, lse = landmark_blocks(q, k, v, bs, key_padding_mask=kpm)
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))
    assert torch.isneginf(lse[0, :, :2]).all() and torch.isfinite(lse[0, :, 2:]).all()
    # the normaliser by hand for one row of block 2: own keys 8..10, landmarks 3 and 7 (item 1: 7 is padded)
    s = (q[1, 0, 10] @ k[1, 0].T) * 4**-0.5
    want = torch.logsumexp(s[[3, 8, 9, 10]], 0)
    torch.testing.assert_close(lse[1, 0, 10], want)
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("backend", [None, "reference"], ids=["fastest", "reference"])
def test_blocks_gradcheck(backend):
    q, k, v = rand_qkv(1, 2, 11, 11, 3, requires_grad=True)
    kpm = torch.zeros(1, 11, dtype=torch.bool)
    kpm[0, 5] = True

    def fn(q, k, v):
        out, lse = landmark_blocks(q, k, v, 3, key_padding_mask=kpm, backend=backend)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))
    tail = lambda q, k, v: landmark_blocks(q, k, v, 4, backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(tail, (q[:, :, 4:], k, v))


def test_blocks_torch_path_chunks(monkeypatch):
    """Several query chunks (each against only the keys it can see) give the one-chunk result."""
    from efficient_attention.kernels import landmark as lk

    q, k, v = rand_qkv(1, 2, 37, 37, 4, requires_grad=True)
    whole = landmark_blocks(q, k, v, 4, backend="reference")
    monkeypatch.setattr(lk, "_CHUNK_ELEMS", 1)  # one block of queries per chunk
    assert len(list(lk._chunks(37, 37, 4, 0, 2))) == 10
    chunked = landmark_blocks(q, k, v, 4, backend="reference")
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(torch.autograd.grad(chunked[0].sum(), (q, k, v)), torch.autograd.grad(whole[0].sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_triton_path_reads_head_views_in_place():
    """The module's head views ``(B, H, L, d)`` of ``(L, B, H*d)`` go to the kernels uncopied (outputs take their
    strides); non-dense views, and views whose row offsets overflow int32, are copied first."""
    from efficient_attention.kernels import landmark as lk

    x = torch.randn(70, 2, 3 * 16)
    heads = x.view(70, 2, 3, 16).permute(1, 2, 0, 3)
    assert lk._rows(heads) is heads
    out = lk._like(heads)
    assert out.stride() == heads.stride() and out.untyped_storage().nbytes() == x.untyped_storage().nbytes()
    sliced = heads[..., :8]  # every other half row: not dense
    assert not lk._dense(sliced) and lk._rows(sliced).is_contiguous()
    assert lk._rows(heads.transpose(-1, -2)).is_contiguous()  # the head dim must have unit stride
    wide = torch.empty(3, 2**28, 1, 16, device="meta").permute(1, 2, 0, 3)  # dense, row offsets past int32
    assert lk._dense(wide) and lk._rows(wide).is_contiguous()


def test_blocks_dispatch_reasons():
    q = torch.randn(1, 2, 8, 16)
    assert landmark_blocks(q, q, q, 4)[0].shape == q.shape
    why = landmark_not_supported_reasons(q, q, q, block_size=48)
    assert why["reference"] == [] and (why["cpp"] == []) == (cpu_extension() is not None)
    assert any("not CUDA" in r for r in why["triton"]) and any("block_size 48" in r for r in why["triton"])
    q48 = torch.randn(1, 2, 8, 48, dtype=torch.float64)
    assert any("dtype" in r for r in landmark_not_supported_reasons(q48, q48, q48, block_size=64)["triton"])
    assert any("head dims" in r for r in landmark_not_supported_reasons(q48, q48, q48, block_size=64)["triton"])


def test_blocks_bad_input():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="block_size"):
        landmark_blocks(q, q, q, 1)
    with pytest.raises(ValueError, match="block_size"):
        landmark_blocks(q, q, q, 4.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        landmark_blocks(q, q, q, 4, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        landmark_blocks(q.long(), q.long(), q.long(), 4)
    with pytest.raises(ValueError, match="more than"):
        landmark_blocks(q, q[:, :, :4], q[:, :, :4], 4)
    with pytest.raises(ValueError, match="backend"):
        landmark_blocks(q, q, q, 4, backend="cuda")


@pytest.mark.parametrize("top_k", [0, 2])
def test_module_fp16_large_inputs_stay_finite(top_k):
    """Inputs x100 in fp16: scores are scaled and formed in fp32 (issue 15 item 6)."""
    torch.manual_seed(0)
    m = ea.LandmarkAttention(64, 2, causal=True, block_size=4, top_k=top_k)  # fp16 q.k of these overflows
    x = torch.randn(21, 2, 64) * 100
    want, _ = m.double()(x.double(), x.double(), x.double(), need_weights=False)
    m = m.half()
    xh = x.half().requires_grad_()
    out, _ = m(xh, xh, xh, need_weights=False)
    assert torch.isfinite(out).all()
    assert _rel(out, want) < 2e-2
    out.float().sum().backward()
    assert torch.isfinite(xh.grad).all()
    steps, _ = decode(m.eval(), x.half())
    assert torch.isfinite(steps).all()
