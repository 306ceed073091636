"""ProbSparse specifics: sample counts, determinism, the running top-u, bad input."""

import math

import pytest
import torch
from helpers import EMBED_DIM, NUM_HEADS, assert_close, decode

from efficient_attention import AttentionMasks, ProbSparse, UnsupportedPatternError
from efficient_attention.attentions.probsparse import hash_samples, log_count, log_counts


def test_sample_count_follows_c_ceil_ln_l():
    assert log_count(5, 100) == 5 * math.ceil(math.log(100)) == 25
    assert log_count(5, 10) == 10 and log_count(5, 1) == 1  # clamped to [1, L]
    n = torch.arange(1, 500)
    assert log_counts(5, n).tolist() == [log_count(5, int(x)) for x in n]


def test_samples_are_deterministic_in_eval_and_in_range():
    pos = torch.arange(50)
    n_vis = pos + 1
    a, b = hash_samples(pos, n_vis, 9), hash_samples(pos, n_vis, 9)
    assert torch.equal(a, b) and bool((a >= 0).all()) and bool((a < n_vis[:, None]).all())
    # a longer sequence samples the same keys for the same positions (what decoding relies on)
    assert torch.equal(hash_samples(torch.arange(80), torch.arange(1, 81), 9)[:50], a)
    torch.manual_seed(0)
    m = ProbSparse(16, 2, factor=2).eval()
    x = torch.randn(30, 2, 16)
    assert torch.equal(m(x, need_weights=False)[0], m(x, need_weights=False)[0])
    m = ProbSparse(16, 2, causal=True, factor=2).train()
    r1, r2 = m.sample_keys(pos, n_vis, 9), m.sample_keys(pos, n_vis, 9)
    assert not torch.equal(r1, r2) and bool((r1 < n_vis[:, None]).all())


def test_running_top_u_by_chunks_equals_brute_force():
    torch.manual_seed(0)
    m = ProbSparse(16, 2, causal=True, factor=3)
    scores = torch.randn(2, 2, 700, dtype=torch.float64)
    scores[0, 0, 100] = -math.inf
    pos = torch.arange(700)
    u = log_counts(3, pos + 1)
    by_chunks = m._causal_selection(scores, u)
    brute = m._running_active(scores, None, u)
    assert torch.equal(by_chunks, brute)
    # a running top-u keeps about u (1 + ln(L / u)) rows, far fewer than L
    assert by_chunks.sum(-1).max() < 200


def test_long_causal_decoding_equals_full():
    torch.manual_seed(0)
    m = ProbSparse(16, 2, causal=True, factor=2).eval()
    x = torch.randn(300, 1, 16)
    full, _ = m(x, need_weights=False)
    steps, _ = decode(m, x[:, :], prefix=270)
    assert_close(steps, full, torch.float32)


def test_noncausal_selects_top_u_queries():
    torch.manual_seed(0)
    m = ProbSparse(16, 2, factor=1).double().eval()
    x = torch.randn(20, 1, 16, dtype=torch.float64)
    q = m.q_proj(x).view(20, 1, 2, 8).permute(1, 2, 0, 3)
    v = m.v_proj(x).view(20, 1, 2, 8).permute(1, 2, 0, 3)
    out = m._attend(q, m.k_proj(x).view(20, 1, 2, 8).permute(1, 2, 0, 3), v, AttentionMasks(), False)[0]
    lazy = (out - v.mean(2, keepdim=True)).abs().amax(-1) < 1e-12
    assert int((~lazy).sum(-1).max()) <= log_count(1, 20)


def test_cross_raises():
    with pytest.raises(UnsupportedPatternError):
        ProbSparse(16, 2, cross=True)


def _check_padded_rows(m, q, k, v):
    """``m._attend`` with the second sequence's last 5 positions padded against the float64 definition, real rows
    only."""
    from references.probsparse import probsparse_rows

    kpm = torch.zeros(2, 90, dtype=torch.bool)
    kpm[1, -5:] = True
    out = m._attend(q, k, v, AttentionMasks(key_padding=kpm, query_padding=kpm), False)[0]
    expected = probsparse_rows(m, q, k, v, kpm)
    assert_close(out[0], expected[0])
    assert_close(out[1, :, :85], expected[1, :, :85])


@pytest.mark.parametrize("causal", [False, True])
def test_longer_than_a_sample_block_matches_the_reference(causal):
    """Several sample blocks (causal), wrapped samples, padding: the float64 definition row by row."""

    torch.manual_seed(0)
    m = ProbSparse(16, 2, causal=causal, factor=2).double().eval()
    q, k, v = (torch.randn(2, 2, 90, 8, dtype=torch.float64) for _ in range(3))
    _check_padded_rows(m, q, k, v)
    idx = m.sample_keys(torch.arange(90), torch.arange(1, 91) if causal else torch.full((90,), 90), 9)
    if causal:
        assert bool((idx <= torch.arange(90)[:, None]).all())


def test_fp16_large_inputs_stay_finite():
    """Scores are scaled before the product and reduced in fp32: no fp16 overflow for large q, k."""
    torch.manual_seed(0)
    m = ProbSparse(16, 2, causal=True, factor=2).half().eval()
    q, k, v = (torch.randn(1, 2, 70, 8).half() * 300 for _ in range(3))
    out = m._attend(q, k, v, AttentionMasks(), False)[0]
    assert torch.isfinite(out).all()
    assert torch.isfinite(m._sparsity(q, k, None, log_counts(2, torch.arange(1, 71)))).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_piecewise_mask_matches_the_kept_mask(dtype):
    """``piecewise_mask`` (the causal active rows' mask built a quarter of the rows at a time, never kept, the
    backward rerunning each quarter): output and every gradient equal the kept mask's."""

    def run(piecewise):
        torch.manual_seed(0)
        m = ProbSparse(EMBED_DIM, NUM_HEADS, causal=True, factor=2, piecewise_mask=piecewise).to(dtype).train()
        x = torch.randn(150, 2, EMBED_DIM, dtype=dtype, requires_grad=True)
        torch.manual_seed(1)  # the same key samples
        out, _ = m(x, need_weights=False)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        return [out, x.grad] + [p.grad for p in m.parameters()]

    for a, b in zip(run(False), run(True)):
        assert_close(b, a, dtype)


def test_piecewise_mask_equals_the_reference_and_ignores_padding():
    """With ``piecewise_mask`` the float64 pass is the definition's; with padding the kept mask runs (same outputs
    as without the option) and padded keys change no real output."""
    from references.probsparse import probsparse_rows

    torch.manual_seed(0)
    m = ProbSparse(16, 2, causal=True, factor=2, piecewise_mask=True).double().eval()
    q, k, v = (torch.randn(2, 2, 90, 8, dtype=torch.float64) for _ in range(3))
    assert_close(m._attend(q, k, v, AttentionMasks(), False)[0], probsparse_rows(m, q, k, v))
    _check_padded_rows(m, q, k, v)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tgt_len,spare", [(9, 0), (9, 1), (4, 0)])
def test_running_mean_matches_autograd_and_gradcheck(padded, tgt_len, spare):
    """The lazy rows' running mean (its own forward and backward, one scan buffer each) against the plain cumsum
    formula, and gradcheck in float64; ``tgt_len < S`` is a decoding prompt's tail, ``spare`` the uninitialised
    row the exact rows' fillers write."""
    from efficient_attention.attentions.probsparse import _RunningMean

    torch.manual_seed(0)
    v = torch.randn(2, 3, 9, 4, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(2, 9) > 0.3).double() if padded else None
    out = _RunningMean.apply(v, keep, tgt_len, spare)[:tgt_len].permute(1, 2, 0, 3)
    kept = v if keep is None else v * keep[:, None, :, None]
    count = torch.arange(1, 10, dtype=torch.float64) if keep is None else keep.cumsum(1).clamp(min=1)[:, None]
    want = (kept.cumsum(2) / count[..., None])[:, :, 9 - tgt_len :]
    torch.testing.assert_close(out, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(out, v, g)[0], torch.autograd.grad(want, v, g)[0])
    assert torch.autograd.gradcheck(lambda v: _RunningMean.apply(v, keep, tgt_len, spare)[:tgt_len], (v,))
