"""Performer-specific behaviour: feature buffers, redrawing, long causal inputs, stability."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import EMBED_DIM, NUM_HEADS, assert_close, decode
from references import get_reference

from efficient_attention import MultiheadAttention, Performer


def make(causal=False, cross=False, **opts):
    torch.manual_seed(0)
    return Performer(EMBED_DIM, NUM_HEADS, causal=causal, cross=cross, **opts).double().eval()


def favor_dense(m, x, causal):
    """FAVOR+ as a dense masked (N, N) kernel in float64 (vectorised; for long inputs)."""
    q = torch.nn.functional.linear(x, m.q_proj.weight, m.q_proj.bias)
    k = torch.nn.functional.linear(x, m.k_proj.weight, m.k_proj.bias)
    v = torch.nn.functional.linear(x, m.v_proj.weight, m.v_proj.bias)
    length, bsz, _ = x.shape

    def split(t):
        return t.view(length, bsz, NUM_HEADS, -1).permute(1, 2, 0, 3)

    q, k, v = split(q), split(k), split(v)
    d = q.shape[-1]
    w = m.projection_matrix

    def logits(t):
        t = t * d**-0.25
        return t @ w.t() - 0.5 * (t * t).sum(-1, keepdim=True)

    # log-space kernel, stable for any magnitude
    log_kernel = torch.logsumexp(logits(q).unsqueeze(-2) + logits(k).unsqueeze(-3), dim=-1)
    if causal:
        log_kernel = log_kernel.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    out = torch.softmax(log_kernel, dim=-1) @ v
    out = out.permute(2, 0, 1, 3).reshape(length, bsz, -1)
    return m.out_proj(out)


def test_features_are_orthogonal_buffers_in_the_state_dict():
    m = make(approx_attn_dim=4)
    assert "projection_matrix" in m.state_dict()
    assert "projection_matrix" not in dict(m.named_parameters())
    w = m.projection_matrix.float()
    gram = w @ w.t()
    off_diag = gram - torch.diag(torch.diagonal(gram))
    assert off_diag.abs().max() < 1e-4 * gram.diagonal().max()
    iid = make(approx_attn_dim=4, orthogonal_features=False).projection_matrix
    assert not torch.equal(iid, m.projection_matrix)


def test_features_redraw_only_in_training():
    m = make(feature_redraw_interval=2)
    x = torch.randn(5, 2, EMBED_DIM, dtype=torch.float64)
    w0 = m.projection_matrix.clone()
    for _ in range(5):
        m(x, need_weights=False)
    assert torch.equal(m.projection_matrix, w0), "eval must never redraw"
    m.train()
    m(x, need_weights=False)
    m(x, need_weights=False)
    assert torch.equal(m.projection_matrix, w0)
    m(x, need_weights=False)  # third training forward: interval of 2 reached
    assert not torch.equal(m.projection_matrix, w0)
    never = make(feature_redraw_interval=0).train()
    w1 = never.projection_matrix.clone()
    for _ in range(4):
        never(x, need_weights=False)
    assert torch.equal(never.projection_matrix, w1)


@pytest.mark.parametrize("orthogonal", [True, False])
def test_feature_kernel_is_unbiased(orthogonal):
    """E[φ(q)·φ(k)] = exp(q·k/√d): with many features the estimate is within a few percent."""
    from efficient_attention.attentions.performer import gaussian_orthogonal_features

    torch.manual_seed(0)
    d = 4
    q, k = torch.randn(5, d, dtype=torch.float64) * 0.5, torch.randn(6, d, dtype=torch.float64) * 0.5
    w = gaussian_orthogonal_features(16384, d, orthogonal).double()

    def phi(x):
        x = x * d**-0.25
        return torch.exp(x @ w.t() - 0.5 * (x * x).sum(-1, keepdim=True))

    ratio = (phi(q) @ phi(k).t() / w.shape[0]) / torch.exp(q @ k.t() / math.sqrt(d))
    assert (ratio - 1).abs().max() < 0.1


def test_many_features_approximate_softmax_attention():
    torch.manual_seed(0)
    m = Performer(EMBED_DIM, NUM_HEADS, approx_attn_dim=4096).double().eval()
    exact = MultiheadAttention(EMBED_DIM, NUM_HEADS).double().eval()
    exact.load_state_dict({k: v for k, v in m.state_dict().items() if k not in ("projection_matrix", "_extra_state")})
    x = torch.randn(9, 2, EMBED_DIM, dtype=torch.float64) * 0.5
    approx, _ = m(x, need_weights=False)
    ref, _ = exact(x, need_weights=False)
    assert (approx - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_long_causal_input_spans_chunks_and_stays_stable(scale):
    """150 positions (3 chunks); large inputs exercise the running-max stabiliser."""
    m = make(causal=True)
    x = torch.randn(150, 1, EMBED_DIM, dtype=torch.float64) * scale
    out, _ = m(x, need_weights=False)
    assert torch.isfinite(out).all()
    assert_close(out, favor_dense(m, x, causal=True), msg="chunked causal FAVOR+")
    steps, state = decode(m, x, prefix=70)
    assert_close(steps, out, msg="decoding across chunk boundaries")
    assert state  # running sums only: (B, H, m, d + 1) with the normaliser column, (B, H, 1, 1)
    buf = next(iter(state.values()))
    assert set(buf) == {"kv_sum", "k_max", "position"}


def test_noncausal_large_inputs_stay_finite_and_exact():
    m = make()
    x = torch.randn(20, 2, EMBED_DIM, dtype=torch.float64) * 30
    out, _ = m(x, need_weights=False)
    assert_close(out, favor_dense(m, x, causal=False))


def test_static_kv_caches_the_key_sums_only():
    m = make(cross=True).float()
    q = torch.randn(4, 2, EMBED_DIM)
    kv = torch.randn(40, 2, EMBED_DIM)
    _, state = decode(m, q, kv, kv, static_kv=True)
    buf = next(iter(state.values()))
    assert buf["prev_key"].shape == (2, NUM_HEADS, m.approx_attn_dim, EMBED_DIM // NUM_HEADS)


@pytest.mark.parametrize("tgt_len,src_len", [(5, 9), (9, 5)])
def test_causal_cross_with_unequal_lengths(tgt_len, src_len):
    """Queries are the last T of S positions: extra keys are seen by all, extra queries see nothing."""
    m = make(causal=True, cross=True)
    q = torch.randn(tgt_len, 2, EMBED_DIM, dtype=torch.float64)
    k, v = torch.randn(2, src_len, 2, EMBED_DIM, dtype=torch.float64)
    kpm = torch.zeros(2, src_len, dtype=torch.bool)
    kpm[1, -2:] = True
    out, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    assert_close(out, get_reference("performer").fn(m, q, k, v, key_padding_mask=kpm))


def test_redraw_counter_travels_with_the_state_dict():
    """A resumed run redraws the features at the same steps as the uninterrupted one (issue 15, item 9)."""
    torch.manual_seed(0)
    m = Performer(EMBED_DIM, NUM_HEADS, feature_redraw_interval=3).train()
    x = torch.randn(5, 2, EMBED_DIM)
    m(x, need_weights=False)
    m(x, need_weights=False)
    resumed = Performer(EMBED_DIM, NUM_HEADS, feature_redraw_interval=3).train()
    resumed.load_state_dict(m.state_dict())
    before = resumed.projection_matrix.clone()
    resumed(x, need_weights=False)  # third forward: no redraw yet
    assert torch.equal(resumed.projection_matrix, before)
    resumed(x, need_weights=False)  # fourth: the interval is reached
    assert not torch.equal(resumed.projection_matrix, before)
    with pytest.raises(ValueError, match="forwards_since_redraw"):
        resumed.set_extra_state({"forwards_since_redraw": -1})


_INTERPRETER_CASE = """
import torch
from efficient_attention import get_attention_class
from efficient_attention.kernels._triton_performer import performer_step

torch.manual_seed(0)
for dtype, autocast in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
    m = get_attention_class("performer")(64, 4, self_attention=True, causal=True).eval().to(dtype)
    x = (torch.randn(18, 3, 64) * 2).to(dtype)
    state = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        m(x[:10], incremental_state=state, need_weights=False)  # (under 16 positions: no Triton in the prompt)
        buf = next(iter(state.values()))
        product = torch.bfloat16 if autocast else torch.float32
        for t in range(10, 18):
            q, k, v = m._project_step(x[t : t + 1])
            ref_state = {n: buf[n].clone() for n in ("kv_sum", "k_max")}
            ref = m._step(q, k, v, ref_state, None)
            kvz, c = buf["kv_sum"].clone(), buf["k_max"].contiguous().clone()
            out = performer_step(q, k, v, m._feature_weight(product), kvz, c, 0.5 * 16**-0.5, product)
            assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
            # rounded to bf16 (the product under autocast, or the inputs), a logit near 5 may land an ulp (0.03)
            # apart from the CPU product's rounding, which moves its feature by 3%: the logic is checked in fp32
            tol = 1e-5 if product == torch.float32 and dtype == torch.float32 else 8e-2
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
            # a rounded product may round a logit, so the running max c, the other way: the sums are those of
            # the PyTorch step at the other's max (the pair (S, c) means S e^c)
            torch.testing.assert_close(kvz * torch.exp(c - ref_state["k_max"]), ref_state["kv_sum"], atol=tol, rtol=tol)
            torch.testing.assert_close(c, ref_state["k_max"], atol=tol * 4, rtol=tol)
            buf.update(ref_state)
print("steps match")
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_decoding_step_matches_the_pytorch_step_in_the_interpreter():
    """The one-launch CUDA step (kernels/_triton_performer.py) against :meth:`Performer._step`, through Triton's
    interpreter on the CPU: outputs and the in-place state, fp32, bf16 autocast (the product rounded) and bf16."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _INTERPRETER_CASE]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "steps match" in run.stdout


@pytest.mark.parametrize("causal", [False, True])
def test_half_key_gradient_in_slices_equals_one_product(monkeypatch, causal):
    """For half keys the fp32 product of the key gradient is made a slice of positions at a time (peak memory):
    one position per slice, and slices that do not divide the length, give the gradient of one product."""
    from efficient_attention.attentions import performer as mod

    torch.manual_seed(0)
    m = Performer(EMBED_DIM, NUM_HEADS, self_attention=True, causal=causal).train()
    x = torch.randn(37, 2, EMBED_DIM)
    grads = []
    for step in (None, 1, 2 * 2 * NUM_HEADS * (EMBED_DIM // NUM_HEADS) * 5):  # whole, per position, 5 positions
        if step is not None:
            monkeypatch.setattr(mod, "KEY_GRAD_SLICE", step)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xi, xi, xi, need_weights=False)[0]
        out.float().square().sum().backward()
        grads.append(xi.grad)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-2, rtol=1e-2)
