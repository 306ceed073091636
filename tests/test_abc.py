"""ABC-specific behaviour: running causal memory, long and large inputs, the cached key memory."""

import pytest
import torch
from helpers import EMBED_DIM, NUM_HEADS, assert_close, decode
from references import get_reference

from efficient_attention import ABC

REF = get_reference("abc").fn


def make(causal=False, cross=False, **opts):
    torch.manual_seed(0)
    return ABC(EMBED_DIM, NUM_HEADS, causal=causal, cross=cross, num_landmarks=5, **opts).double().eval()


def test_causal_memory_accumulates_over_past_tokens():
    """The reference library's causal ABC never accumulated: here the last output depends on the first key."""
    m = make(causal=True)
    x = torch.randn(12, 2, EMBED_DIM, dtype=torch.float64)
    out, _ = m(x, need_weights=False)
    x2 = x.clone()
    x2[0] += 1.0
    out2, _ = m(x2, need_weights=False)
    assert (out2[-1] - out[-1]).abs().max() > 1e-6


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_long_and_large_causal_inputs(scale):
    """40 positions span two chunks; scale 100 makes slot scores differ by thousands.

    The slot weights share one log-domain stabiliser per position (the running max over all slots), so in
    fp32 a slot whose scores stay more than ~70 below the best slot's underflows to an empty slot: fp32 is
    checked for accuracy up to scale 10 (slot scores a few tens apart) and for finiteness beyond; float64
    (range ~700) stays exact.
    """
    m = make(causal=True)
    x = torch.randn(40, 1, EMBED_DIM, dtype=torch.float64) * scale
    expected = REF(m, x, x, x)
    out, _ = m(x, need_weights=False)
    assert_close(out, expected, msg="float64")
    out32, _ = make(causal=True).float()(x.float(), need_weights=False)
    assert torch.isfinite(out32).all()
    if scale <= 10:
        assert (out32.double() - expected).abs().max() < 1e-5 * expected.abs().max() * max(scale, 1.0)
    steps, state = decode(m, x, prefix=20)
    assert_close(steps, expected, msg="decoding")
    buf = next(iter(state.values()))
    assert set(buf) == {"mem_k", "mem_v", "mem_norm", "mem_max", "position"}
    assert buf["mem_k"].shape == (1, NUM_HEADS, 5, EMBED_DIM // NUM_HEADS)


def test_static_kv_caches_the_key_side_memory():
    m = make(cross=True)
    q = torch.randn(4, 2, EMBED_DIM, dtype=torch.float64)
    kv = torch.randn(30, 2, EMBED_DIM, dtype=torch.float64)
    full, _ = m(q, kv, kv, need_weights=False)
    steps, state = decode(m, q, kv, kv, static_kv=True)
    assert_close(steps, full)
    buf = next(iter(state.values()))
    assert buf["prev_key"].shape == (2, NUM_HEADS, 5, EMBED_DIM // NUM_HEADS)  # n slots, not 30 keys


def test_dropout_on_slot_probabilities_only_in_training():
    m = make(dropout=0.5)
    x = torch.randn(6, 2, EMBED_DIM, dtype=torch.float64)
    assert torch.equal(m(x, need_weights=False)[0], m(x, need_weights=False)[0])
    m.train()
    torch.manual_seed(1)
    a, _ = m(x, need_weights=False)
    b, _ = m(x, need_weights=False)
    assert not torch.allclose(a, b)
    causal = make(causal=True, dropout=0.5).train()
    assert not torch.allclose(causal(x, need_weights=False)[0], causal(x, need_weights=False)[0])


@pytest.mark.parametrize("tgt_len,src_len", [(5, 9), (9, 5)])
def test_causal_cross_with_unequal_lengths(tgt_len, src_len):
    """Queries are the last T of S positions: extra keys are seen by all, extra queries see nothing."""
    m = make(causal=True, cross=True)
    q = torch.randn(tgt_len, 2, EMBED_DIM, dtype=torch.float64)
    k, v = torch.randn(2, src_len, 2, EMBED_DIM, dtype=torch.float64)
    kpm = torch.zeros(2, src_len, dtype=torch.bool)
    kpm[1, -2:] = True
    out, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    assert_close(out, get_reference("abc").fn(m, q, k, v, key_padding_mask=kpm))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_slot_read_gradient_matches_autograd(dropout, recompute):
    """The slot softmax's hand-written backward (one autograd node) against gradcheck in float64, an empty slot
    (normaliser underflowed: left out) and a dropout mask included."""
    from efficient_attention.attentions.abc import _SlotRead

    torch.manual_seed(0)
    num = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    nl = (torch.randn(2, 3, 7, 5, dtype=torch.float64) - 1).requires_grad_(True)
    with torch.no_grad():
        nl[0, 0, 0, 2] = 800.0  # normaliser e^-800: empty
    mask = (torch.rand(2, 3, 7, 5, dtype=torch.float64) > 0.3) / 0.7 if dropout else None
    out = _SlotRead.apply(num, nl, 0.3, mask, torch.float64, recompute)
    assert out[0, 0, 0, 2] == 0 and torch.isfinite(out).all()
    read = lambda a, b: _SlotRead.apply(a, b, 0.3, mask, torch.float64, recompute)  # noqa: E731
    assert torch.autograd.gradcheck(read, (num, nl))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fresh_causal_path_matches_the_general_one(monkeypatch, dtype, scan):
    """Causal self attention without padding or state (training) takes the hand-written slot softmax and, on CUDA
    (``scan``), two linear attentions and the normalisers from a logcumsumexp; its output and every gradient equal
    the general path's (an all-False padding mask takes it) over several chunks, with large scores."""
    if scan:  # the CUDA path: normalisers from a logcumsumexp
        monkeypatch.setattr(ABC, "SCAN_DEVICES", ("cpu", "cuda"))
    m = make(causal=True).to(dtype)
    x = (torch.randn(150, 2, EMBED_DIM, dtype=torch.float64) * 3).to(dtype)
    results = []
    for kpm in (None, torch.zeros(2, 150, dtype=torch.bool)):
        xi = x.detach().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        out, _ = m(xi, key_padding_mask=kpm, need_weights=False)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append([out, xi.grad] + [p.grad for p in m.parameters()])
    assert_close(results[0][0], results[1][0], dtype)
    scale = max(float(w.abs().max()) for w in results[1][1:])  # a gradient that is ~0 exactly (k's bias) is noise
    for got, want in zip(results[0][1:], results[1][1:]):
        assert_close(got / scale, want / scale, dtype)


@pytest.mark.parametrize("dropout", [False, True])
def test_slot_attention_gradient_matches_autograd(dropout):
    """The noncausal read's hand-written backward (one autograd node, no SDPA) against gradcheck in float64, on a
    head view of time-first projections (as the module passes it) with a dropout mask."""
    from efficient_attention.attentions.abc import _SlotAttention

    torch.manual_seed(0)
    q = torch.randn(7, 2, 3, 4, dtype=torch.float64).permute(1, 2, 0, 3).requires_grad_(True)  # (B, H, T, d) view
    mem_k, mem_v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = (torch.rand(2, 3, 7, 5, dtype=torch.float64) > 0.3) / 0.7 if dropout else None
    out = _SlotAttention.apply(q, mem_k, mem_v, 0.3, mask)
    if mask is None:
        assert_close(out, torch.softmax(q @ mem_k.transpose(-1, -2) * 0.3, -1) @ mem_v)
    assert torch.autograd.gradcheck(lambda a, b, c: _SlotAttention.apply(a, b, c, 0.3, mask), (q, mem_k, mem_v))


def test_decoding_step_kernel_says_why_it_cannot_run():
    """The one-launch step (CUDA) declines in words: the CPU, a float64 state, gradients, dropout; the PyTorch form
    takes everything (its results are the generic tests' incremental = full)."""
    from efficient_attention.kernels.abc_step import ABC_STEP

    q = torch.randn(2, NUM_HEADS, 1, 8, dtype=torch.float64)
    reasons = ABC_STEP.not_supported_reasons(q, q, q, slots=5, state_dtype=torch.float64, grad=True, dropout=True)
    text = " ".join(reasons["triton"])
    for words in ("not CUDA" if not torch.cuda.is_available() else "", "fp32", "gradients", "dropout"):
        assert words in text, text
    assert reasons["reference"] == []


def test_slot_weights_match_autograd():
    """The CUDA path's slot weights, log decays and normalisers (one autograd node: one logcumsumexp, a hand-written
    backward keeping no fp32 copy) against autograd over the plain formulas in float64 (the running max a
    constant, as everywhere in ABC: the output does not depend on it), with scores hundreds apart (the signed
    reversed scan stays finite)."""
    from efficient_attention.attentions.abc import _SlotWeights

    torch.manual_seed(0)
    k = torch.randn(2, 3, 9, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 30.0, 300.0, 3.0])[:, None]).requires_grad_()
    e, nl, _, decay = _SlotWeights.apply(k, w, True)
    a = k @ w.transpose(-1, -2)
    run = torch.cummax(a.detach().amax(-1), dim=-1).values
    e_ref, nl_ref = torch.exp(a - run.unsqueeze(-1)), run.unsqueeze(-1) - torch.logcumsumexp(a, dim=-2)
    assert_close(e, e_ref)
    assert_close(nl, nl_ref)
    assert_close(decay, torch.cat([torch.zeros_like(run[..., :1]), run[..., :-1] - run[..., 1:]], -1))
    ge, gnl = torch.randn_like(e), torch.randn_like(nl)
    got = torch.autograd.grad((e * ge).sum() + (nl * gnl).sum(), (k, w))
    want = torch.autograd.grad((e_ref * ge).sum() + (nl_ref * gnl).sum(), (k, w))
    for x, y in zip(got, want):
        assert_close(x, y)


def test_slot_memory_gradient_matches_autograd():
    """The unpadded key-side memory's hand-written backward (one autograd node) against gradcheck in float64, on
    head views of time-first projections (as the module passes them)."""
    from efficient_attention.attentions.abc import _SlotMemory

    torch.manual_seed(0)
    k, v = (torch.randn(7, 2, 3, 4, dtype=torch.float64).permute(1, 2, 0, 3).requires_grad_(True) for _ in range(2))
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    mem_k, mem_v = _SlotMemory.apply(k, v, w)
    alpha = torch.softmax(w @ k.transpose(-1, -2), -1)
    assert_close(mem_k, alpha @ k)
    assert_close(mem_v, alpha @ v)
    assert torch.autograd.gradcheck(_SlotMemory.apply, (k, v, w))
