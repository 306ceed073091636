"""LARA-specific behaviour: padding is invisible, sampling only in training, short sequences."""

import pytest
import torch
from helpers import EMBED_DIM, NUM_HEADS, assert_close
from references import get_reference

from efficient_attention import LARA, Lara


def make(**opts):
    torch.manual_seed(0)
    return Lara(EMBED_DIM, NUM_HEADS, **{"num_landmarks": 4, **opts}).double().eval()


def test_alias():
    assert LARA is Lara


@pytest.mark.parametrize("pad_left", [True, False])
def test_padded_sequence_gives_the_unpadded_output(pad_left):
    m = make()
    x = torch.randn(13, 1, EMBED_DIM, dtype=torch.float64)
    alone, _ = m(x, need_weights=False)
    junk = torch.randn(5, 1, EMBED_DIM, dtype=torch.float64) * 10
    padded = torch.cat([junk, x] if pad_left else [x, junk])
    kpm = torch.zeros(1, 18, dtype=torch.bool)
    kpm[0, :5] = pad_left
    kpm[0, 13:] = not pad_left
    out, _ = m(padded, key_padding_mask=kpm, need_weights=False)
    real = out[5:] if pad_left else out[:13]
    assert_close(real, alone)


def test_sampling_only_in_training():
    m = make()
    x = torch.randn(10, 2, EMBED_DIM, dtype=torch.float64)
    assert torch.equal(m(x, need_weights=False)[0], m(x, need_weights=False)[0])
    m.train()
    a, _ = m(x, need_weights=False)
    b, _ = m(x, need_weights=False)
    assert not torch.allclose(a, b)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("length", [1, 3, 4])
def test_sequences_shorter_than_the_landmarks(length):
    m = make()
    x = torch.randn(length, 2, EMBED_DIM, dtype=torch.float64)
    out, _ = m(x, need_weights=False)
    assert_close(out, get_reference("lara").fn(m, x, x, x))


def test_fully_padded_sequence_has_finite_gradients():
    m = make().train()
    x = torch.randn(6, 2, EMBED_DIM, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True
    out, _ = m(x, key_padding_mask=kpm, need_weights=False)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def _out_and_grads(m, x, kpm):
    x = x.detach().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same proposal noise in training
    out, _ = m(x, key_padding_mask=kpm, need_weights=False)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_equal_segments_path_matches_the_general_one(dtype, training):
    """No padding and a length that is a multiple of C: segment means of views, plain softmaxes, ``-|q'|²/2``
    cancelled in the softmax over proposals; outputs and every gradient equal the general path's (an all-False
    padding mask takes it), with the same proposal noise in training, and the float64 reference in eval."""
    from references import get_reference

    torch.manual_seed(0)
    m = Lara(EMBED_DIM, NUM_HEADS, num_landmarks=4).to(dtype).train(training)
    x = torch.randn(16, 2, EMBED_DIM, dtype=torch.float64).to(dtype)
    out, grads = _out_and_grads(m, x, None)
    general, general_grads = _out_and_grads(m, x, torch.zeros(2, 16, dtype=torch.bool))
    assert_close(out, general, dtype)
    for g, r in zip(grads, general_grads):
        assert_close(g, r, dtype)
    if not training:
        assert_close(out, get_reference("lara").fn(m.double(), x.double(), x.double(), x.double()), dtype)


@pytest.mark.parametrize("training", [False, True])
def test_length_chunks_path_matches_the_general_one(monkeypatch, training):
    """The CUDA layout (the length split into chunks so that no product reduces over all of it) on the CPU."""
    from efficient_attention.functional import LengthChunks

    monkeypatch.setattr(LengthChunks, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(LengthChunks, "SIZE", 4)
    monkeypatch.setattr(LengthChunks, "MIN_LENGTH", 8)
    test_equal_segments_path_matches_the_general_one(torch.float64, training)
