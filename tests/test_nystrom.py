"""Nyströmformer-specific behaviour: exactness for short inputs, 1/sqrt(d), padding, pinv, half precision."""

import importlib.util
import os
import subprocess
import sys

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


_INTERPRETER_CASE = """
import torch
from efficient_attention import NystromAttention
from efficient_attention.attentions import nystrom
from efficient_attention.kernels._triton_nystrom import NystromCore

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()

for c, d in ((16, 64), (10, 24), (40, 32)):  # padded landmark and head dims, more than one tile of 16
    torch.manual_seed(0)
    ins = [torch.randn(3, c, d) * 0.5 for _ in range(3)]
    g = torch.randn(3, c, d)
    got_in = [t.clone().requires_grad_() for t in ins]
    NystromCore.apply(*got_in, 6).backward(g)
    ref_in = [t.double().requires_grad_() for t in ins]
    kernel2 = torch.softmax(ref_in[0] @ ref_in[1].transpose(1, 2), -1)
    ref = nystrom.iterative_pinv(kernel2, 6, stochastic=True) @ ref_in[2]
    ref.backward(g.double())
    got = NystromCore.apply(*ins, 6)
    assert rel(got, ref) < 1e-5, (c, d, rel(got, ref))
    for a, b in zip(got_in, ref_in):
        assert rel(a.grad, b.grad) < 1e-5, (c, d, rel(a.grad, b.grad))

from efficient_attention.functional import LengthChunks

# the module: fp32 here runs the kernels (interpreter), fp64 the ATen ops; the CUDA layout (the length in chunks)
for opts, chunks in (({}, False), ({"conv_kernel_size": 3}, False), ({}, True)):
    if chunks:
        LengthChunks.DEVICES, LengthChunks.SIZE, LengthChunks.MIN_LENGTH = ("cpu", "cuda"), 16, 32
    torch.manual_seed(0)
    m = NystromAttention(32, 2, num_landmarks=8, **opts).train()
    x = torch.randn(48, 2, 32, requires_grad=True)
    out = m(x, x, x, need_weights=False)[0]
    out.sum().backward()
    assert "failed" not in nystrom._TRITON_CORE, nystrom._TRITON_CORE
    x16 = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = m(x16, x16, x16, need_weights=False)[0]
    out16.float().sum().backward()
    x64 = x.detach().double().requires_grad_()
    out64 = m.double()(x64, x64, x64, need_weights=False)[0]
    out64.sum().backward()
    m.float()
    assert rel(out, out64) < 1e-5 and rel(x.grad, x64.grad) < 1e-5, (opts, rel(out, out64), rel(x.grad, x64.grad))
    assert rel(out16, out64) < 3e-2 and rel(x16.grad, x64.grad) < 3e-2, (opts, rel(out16, out64))
print("core matches")
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_landmark_core_matches_the_pytorch_ops_in_the_interpreter():
    """The two-launch landmark core (kernels/_triton_nystrom.py: softmax, Newton-Schulz pseudo-inverse, product
    and their backward) against the PyTorch ops in float64, through Triton's interpreter on the CPU; and the
    module's fp32 gradients through it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CASE], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "core matches" in run.stdout


@pytest.mark.parametrize("name", ["nystrom", "lara"])
def test_hand_written_backward_keeps_its_inputs_for_a_kept_graph(name):
    """The even-length paths' backwards free q, k, v once read (``functional.take_inputs``): with
    ``retain_graph=True`` they keep them, and a second backward gives the same gradients; without it a second
    backward is a clear error, not a wrong gradient."""
    from efficient_attention import build_attention

    torch.manual_seed(0)
    m = build_attention(name, embed_dim=EMBED_DIM, num_heads=NUM_HEADS, num_landmarks=4, self_attention=True).double()
    x = torch.randn(32, 2, EMBED_DIM, dtype=torch.float64, requires_grad=True)
    loss = m(x, x, x, need_weights=False)[0].pow(2).sum()
    first = torch.autograd.grad(loss, [x, *m.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *m.parameters()], retain_graph=False)
    for a, b in zip(first, second):
        assert_close(b, a)
    with pytest.raises(RuntimeError, match="backward"):
        torch.autograd.grad(loss, [x])
