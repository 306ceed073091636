"""Nyströmformer-specific behaviour: exactness for short inputs, 1/sqrt(d), padding, pinv, half precision."""

import pytest
import torch
from helpers import EMBED_DIM, NUM_HEADS, assert_close

from efficient_attention import MultiheadAttention, NystromAttention, Nystromformer
from efficient_attention.attentions.nystrom import iterative_pinv


def make(**opts):
    torch.manual_seed(0)
    return NystromAttention(EMBED_DIM, NUM_HEADS, **{"num_landmarks": 4, **opts}).double().eval()


def vanilla_like(m):
    exact = MultiheadAttention(EMBED_DIM, NUM_HEADS).double().eval()
    exact.load_state_dict(m.state_dict())
    return exact


def test_alias():
    assert Nystromformer is NystromAttention


@pytest.mark.parametrize("length", [1, 4])
def test_exact_softmax_attention_with_few_tokens(length):
    """<= num_landmarks tokens: exactly fairseq's attention (so logits are scaled by 1/sqrt(d))."""
    m = make()
    x = torch.randn(length, 2, EMBED_DIM, dtype=torch.float64)
    assert_close(m(x, need_weights=False)[0], vanilla_like(m)(x, need_weights=False)[0])


def test_mixed_batch_uses_exact_attention_only_for_short_rows():
    m = make()
    x = torch.randn(9, 2, EMBED_DIM, dtype=torch.float64)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 3:] = True  # row 1 has 3 real tokens
    out, _ = m(x, key_padding_mask=kpm, need_weights=False)
    exact, _ = vanilla_like(m)(x, key_padding_mask=kpm, need_weights=False)
    assert_close(out[:3, 1], exact[:3, 1])
    assert (out[:, 0] - exact[:, 0]).abs().max() > 1e-8  # row 0 is approximated


def test_more_landmarks_approximate_softmax_attention_better():
    torch.manual_seed(1)
    x = torch.randn(32, 2, EMBED_DIM, dtype=torch.float64)
    errors = []
    for landmarks in (8, 16, 31):
        m = make(num_landmarks=landmarks)
        approx, _ = m(x, need_weights=False)
        exact, _ = vanilla_like(m)(x, need_weights=False)
        errors.append((approx - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 * exact.abs().max()


def test_padded_sequence_gives_the_unpadded_output():
    m = make(conv_kernel_size=3)
    x = torch.randn(13, 1, EMBED_DIM, dtype=torch.float64)
    alone, _ = m(x, need_weights=False)
    padded = torch.cat([torch.randn(5, 1, EMBED_DIM, dtype=torch.float64) * 10, x])
    kpm = torch.zeros(1, 18, dtype=torch.bool)
    kpm[0, :5] = True
    out, _ = m(padded, key_padding_mask=kpm, need_weights=False)
    assert_close(out[5:], alone)


def test_iterative_pinv_matches_the_exact_pseudo_inverse():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 8, 8, dtype=torch.float64), dim=-1)
    assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), msg="converged Newton-Schulz")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_long_input(dtype):
    m = make(num_landmarks=8)
    x = torch.randn(200, 1, EMBED_DIM, dtype=torch.float64)
    expected, _ = m(x, need_weights=False)
    out, _ = m.to(dtype)(x.to(dtype), need_weights=False)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max()


def test_conv_kernel_adds_a_value_convolution():
    m = make(conv_kernel_size=5)
    assert m.conv.weight.shape == (NUM_HEADS, 1, 5, 1)
    x = torch.randn(9, 2, EMBED_DIM, dtype=torch.float64)
    with_conv, _ = m(x, need_weights=False)
    torch.nn.init.zeros_(m.conv.weight)
    without, _ = m(x, need_weights=False)
    assert (with_conv - without).abs().max() > 1e-6


def _out_and_grads(m, x, kpm):
    x = x.detach().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    out, _ = m(x, key_padding_mask=kpm, need_weights=False)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_equal_segments_path_matches_the_general_one(dtype):
    """No padding and a length that is a multiple of the landmarks: segment means of views, plain softmaxes and
    the stochastic pseudo-inverse; outputs and every gradient equal the general path's (an all-False padding
    mask takes it) and the float64 reference."""
    from references import get_reference

    m = make(conv_kernel_size=3).to(dtype)
    x = torch.randn(16, 2, EMBED_DIM, dtype=torch.float64).to(dtype)
    out, grads = _out_and_grads(m, x, None)
    general, general_grads = _out_and_grads(m, x, torch.zeros(2, 16, dtype=torch.bool))
    assert_close(out, get_reference("nystrom").fn(m.double(), x.double(), x.double(), x.double()), dtype)
    assert_close(out, general, dtype)
    for g, r in zip(grads, general_grads):
        assert_close(g, r, dtype)


def test_newton_schulz_backward_equals_autograd_of_the_iterations():
    from efficient_attention.attentions.nystrom import _NewtonSchulz

    def plain(a, z, iterations):
        eye = torch.eye(a.shape[-1], dtype=a.dtype)
        for _ in range(iterations):
            x = a @ z
            z = 0.25 * z @ (13 * eye - x @ (15 * eye - x @ (7 * eye - x)))
        return z

    torch.manual_seed(0)
    a = torch.softmax(torch.randn(4, 6, 6, dtype=torch.float64), -1).requires_grad_(True)
    z0 = (a.detach().transpose(-1, -2) / 3).requires_grad_(True)
    out = _NewtonSchulz.apply(a, z0, 6)
    expected = plain(a, z0, 6)
    assert_close(out, expected)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (a, z0), g), torch.autograd.grad(expected, (a, z0), g)):
        assert_close(got, want)
    assert torch.autograd.gradcheck(lambda a, z: _NewtonSchulz.apply(a, z, 2), (a, z0))


def test_length_chunks_path_matches_the_general_one(monkeypatch):
    """The CUDA layout (the length split into chunks so that no product reduces over all of it) on the CPU."""
    from efficient_attention.functional import LengthChunks

    monkeypatch.setattr(LengthChunks, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(LengthChunks, "SIZE", 4)
    monkeypatch.setattr(LengthChunks, "MIN_LENGTH", 8)
    test_equal_segments_path_matches_the_general_one(torch.float64)
