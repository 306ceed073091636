"""Long-Short specifics: the front, longer sequences against the reference, bounded memories, bad input."""

import pytest
import torch
from helpers import assert_close, decode
from references.longshort import longshort_reference

from efficient_attention import AttentionLS, CausalLS, LongShort, UnsupportedPatternError

OPTS = dict(window_size=3, num_landmarks=4, chunk_size=3, chunk_rank=2)


def test_front_picks_by_causal():
    assert type(LongShort(16, 2)) is AttentionLS
    assert type(LongShort(16, 2, causal=True)) is CausalLS
    with pytest.raises(UnsupportedPatternError, match="LongShort"):
        LongShort(16, 2, cross=True)
    with pytest.raises(UnsupportedPatternError):
        AttentionLS(16, 2, causal=True)
    with pytest.raises(UnsupportedPatternError):
        CausalLS(16, 2, causal=False)


@pytest.mark.parametrize("causal", [False, True])
def test_longer_sequence_matches_reference(causal):
    torch.manual_seed(0)
    m = LongShort(16, 2, causal=causal, **OPTS).double().eval()
    x = torch.randn(23, 2, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 23, dtype=torch.bool)
    kpm[1, -7:] = True  # the last chunks of batch 1 are padding
    out, _ = m(x, key_padding_mask=kpm, need_weights=False)
    expected = longshort_reference(m, x, x, x, key_padding_mask=kpm)
    assert_close(out[:, 0], expected[:, 0])
    assert_close(out[:16, 1], expected[:16, 1])


def test_causal_memory_reach_is_bounded_and_decoding_state_constant():
    torch.manual_seed(0)
    m = CausalLS(16, 2, **OPTS).eval()
    x = torch.randn(60, 1, 16)
    out, _ = m(x, need_weights=False)
    # memories: the last num_landmarks // chunk_rank = 2 chunks before the own one, window: 2 blocks of 3
    x2 = x.clone()
    x2[:40] += 1.0
    assert torch.allclose(m(x2, need_weights=False)[0][54:], out[54:])  # reach 2*3 + 2*3 < 14
    steps, state = decode(m, x, prefix=10)
    assert_close(steps, out, torch.float32)
    (buf,) = state.values()
    assert buf["memory_key"].shape[2] == 4 and buf["chunk_key"].shape[2] == 3 and buf["prev_key"].shape[2] == 5


@pytest.mark.parametrize("kw,match", [(dict(causal=True, num_landmarks=1, chunk_rank=2), "num_landmarks")])
def test_bad_option_combinations(kw, match):
    """Single options are checked by tests/test_options.py; this rule involves two options and the pattern."""
    with pytest.raises(ValueError, match=match):
        LongShort(16, 2, **kw)


def test_combine_attention_gradient_is_zero_for_rows_that_see_nothing():
    """torch.logsumexp's backward is NaN for an all -inf row; combine_attention's must be 0 (issue 15 item 4)."""
    from efficient_attention.functional import combine_attention, logsumexp

    lse = torch.tensor([[0.5, float("-inf"), float("-inf")], [1.0, 2.0, float("-inf")]], requires_grad=True)
    outs = [torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
    out, total = combine_attention(outs, [lse[0], lse[1]])
    assert torch.equal(out[2], torch.zeros(2)) and torch.isneginf(total[2])
    (out.sum() + total[:2].sum()).backward()
    assert torch.isfinite(lse.grad).all() and torch.all(lse.grad[:, 2] == 0)
    assert all(torch.isfinite(o.grad).all() for o in outs)
    x = torch.tensor([[float("-inf")] * 3, [0.0, 1.0, float("-inf")]], dtype=torch.float64, requires_grad=True)
    y = logsumexp(x)
    torch.testing.assert_close(y[1], torch.logsumexp(x[1].detach(), -1))
    y[1].backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("outputs", ["both", "keys", "values"])
def test_compress_backward_gradcheck(padded, outputs):
    """The dynamic projection's hand-written backward (one node, probabilities recomputed) in float64, with a
    padding mask (a group of padding only included) and with only one of its two outputs used."""
    from efficient_attention.attentions.longshort import _Compress

    torch.manual_seed(0)
    k, v = (torch.randn(2, 3, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    proj = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    pad = None
    if padded:
        pad = torch.rand(2, 2, 5) > 0.6
        pad[1, 1] = True

    def fn(k, v, proj):
        kbar, vbar = _Compress.apply(k, v, proj, pad)
        return {"both": (kbar, vbar), "keys": (kbar,), "values": (vbar,)}[outputs]

    assert torch.autograd.gradcheck(fn, (k, v, proj))


def test_compression_with_its_length_split_matches(monkeypatch):
    """On CUDA the compression's reductions over a long group (noncausal: the whole sequence) are split into
    chunks (``_Compress``: one cuBLAS tile per (batch, head) ran the whole length); forced here on the CPU,
    output and gradients equal the unsplit products'."""
    import importlib

    ls = importlib.import_module("efficient_attention.attentions.longshort")
    torch.manual_seed(0)
    m = LongShort(16, 2, **OPTS).double()
    x = torch.randn(24, 2, 16, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 24, dtype=torch.bool)
    kpm[1, -5:] = True
    runs = []
    for split in (1, 4):
        monkeypatch.setattr(ls, "_split_k", lambda length, x, split=split: split if length % split == 0 else 1)
        out, _ = m(x, key_padding_mask=kpm, need_weights=False)
        runs.append([out, *torch.autograd.grad(out.pow(2).sum(), [x, m.landmark_proj])])
    for got, want in zip(runs[1], runs[0]):
        assert_close(got, want)
