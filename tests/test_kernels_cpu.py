"""The C++ CPU kernels (torch.ops.efficient_attention.*) and the dispatching entries.

Every kernel is compared with the float64 reference path over random shapes, odd
lengths, padding, empty rows and all dtypes; gradients (including through the
log-sum-exp) likewise; gradcheck in float64; opcheck; a torch.compile smoke test.
"""

import logging
import os

import pytest
import torch
from helpers import TOL
from kernel_cases import (
    WINDOWS,
    loss_and_grads,
    make_qkv,
    padding,
    random_layout,
    ref_block,
    ref_positions,
    ref_sliding,
    row_positions,
)

from efficient_attention.block_mask import BlockMask
from efficient_attention.kernels import (
    block_sparse_attention,
    choose_backend,
    not_supported_reasons,
    sliding_window_attention,
)
from efficient_attention.kernels._loader import cpu_extension, cpu_extension_reason
from efficient_attention.local_window import LocalWindow

if cpu_extension() is None:
    if os.environ.get("EA_BUILD_EXT") == "0" or os.environ.get("EA_DISABLE_KERNELS", "0") not in ("", "0"):
        pytest.skip(f"C++ kernels deliberately not built: {cpu_extension_reason()}", allow_module_level=True)
    raise RuntimeError(f"the C++ kernels should be built here: {cpu_extension_reason()}")

_C = cpu_extension()
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GRAD_TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=1e-1),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
}


def _close(got, ref, tol):
    assert torch.isfinite(got[torch.isfinite(ref)]).all()
    torch.testing.assert_close(got.double(), ref.double(), **tol)


def _compare(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    _close(out, ref_out, TOL[dtype])
    fin = torch.isfinite(ref_lse)
    _close(lse[fin], ref_lse[fin], TOL[torch.float32] if dtype != torch.float64 else TOL[dtype])


@pytest.fixture(params=[True, False], ids=["brgemm", "loops"])
def gemm_path(request):
    if request.param and not _C.brgemm_available():
        pytest.skip("this PyTorch build has no oneDNN brgemm; the loop path is tested")
    before = _C.use_brgemm()
    _C.set_use_brgemm(request.param)
    yield request.param
    _C.set_use_brgemm(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_sliding_window_matches_float64(window, dtype, gemm_path):
    g = torch.Generator().manual_seed(hash((str(window), str(dtype))) % 1000)
    B, H, d = 2, 3, int(torch.randint(4, 40, (1,), generator=g))
    S = int(torch.randint(60, 150, (1,), generator=g)) | 1  # odd lengths
    q_offset = 0 if window.group > 1 else int(torch.randint(0, 7, (1,), generator=g))
    T = S - q_offset
    q, k, v = make_qkv(B, H, T, S, d, dtype, seed=S)
    kpm = padding(B, S)
    assert choose_backend("sliding_window", q, k, v) == "cpp"
    out, lse = sliding_window_attention(q, k, v, window, q_offset=q_offset, key_padding_mask=kpm)
    ref_out, ref_lse, ref_in = ref_sliding(q, k, v, window, q_offset=q_offset, key_padding_mask=kpm)
    _compare(out, lse, ref_out, ref_lse, dtype)
    for got, want in zip(loss_and_grads(out, lse, (q, k, v)), loss_and_grads(ref_out, ref_lse, ref_in)):
        assert not torch.isnan(got).any()
        _close(got, want, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bs,T,S,layout_heads", [(16, 64, 64, 3), (16, 77, 77, 1), (32, 50, 130, 3), (7, 30, 23, 3)])
def test_block_sparse_matches_float64(bs, T, S, layout_heads, causal, dtype, gemm_path):
    B, H, d = 2, 3, 24
    q, k, v = make_qkv(B, H, T, S, d, dtype, seed=T + S)
    layout = random_layout(layout_heads, -(-T // bs), -(-S // bs), seed=bs)
    kpm = padding(B, S)
    out, lse = block_sparse_attention(q, k, v, layout, bs, causal=causal, key_padding_mask=kpm)
    ref_out, ref_lse, ref_in = ref_block(q, k, v, layout, bs, causal=causal, key_padding_mask=kpm)
    _compare(out, lse, ref_out, ref_lse, dtype)
    for got, want in zip(loss_and_grads(out, lse, (q, k, v)), loss_and_grads(ref_out, ref_lse, ref_in)):
        assert not torch.isnan(got).any()
        _close(got, want, GRAD_TOL[dtype])


def test_empty_rows_give_zero_not_nan():
    q, k, v = make_qkv(2, 2, 33, 33, 8, torch.float32)
    kpm = padding(2, 33, full_row=True)
    for out, lse in (
        sliding_window_attention(q, k, v, LocalWindow.sliding(4, 4), key_padding_mask=kpm),
        block_sparse_attention(q, k, v, torch.ones(1, 3, 3, dtype=torch.bool), 16, key_padding_mask=kpm),
    ):
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
        grads = torch.autograd.grad(out.sum() + lse[1].sum(), (q, k, v))
        assert all(torch.isfinite(g_).all() for g_ in grads)
        assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))


def test_gqa_noncontiguous_and_value_dim():
    q, k, v = make_qkv(2, 4, 45, 45, 16, torch.float32, hkv=2, dv=8)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # odd strides
    window = LocalWindow.sliding(9, 3)
    out, lse = sliding_window_attention(qt, k, v, window)
    ref_out, ref_lse, ref_in = ref_sliding(qt, k, v, window)
    _compare(out, lse, ref_out, ref_lse, torch.float32)
    for got, want in zip(loss_and_grads(out, lse, (qt, k, v)), loss_and_grads(ref_out, ref_lse, ref_in)):
        _close(got, want, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("op", ["sliding_window", "block_sparse"])
def test_gradcheck_float64(op):
    q, k, v = make_qkv(1, 2, 21, 21, 4, torch.float64)
    kpm = padding(1, 21)
    kpm[0, :2] = False
    if op == "sliding_window":
        fn = lambda q, k, v: sliding_window_attention(q, k, v, LocalWindow.sliding(5, 2), key_padding_mask=kpm)  # noqa: E731
    else:
        layout = random_layout(2, 3, 3, density=0.6, empty_row=False) | torch.eye(3, dtype=torch.bool)  # no -inf lse
        fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, 8, causal=True, key_padding_mask=kpm)  # noqa: E731
    assert choose_backend(op, q, k, v) == "cpp"
    assert torch.autograd.gradcheck(fn, (q, k, v))


def _op_samples():
    # the ops are the forward kernels, without autograd of their own (that is ops.py's autograd.Function,
    # checked by the gradchecks above)
    q, k, v = (x.detach() for x in make_qkv(2, 2, 19, 19, 8, torch.float32))
    kpm = padding(2, 19)
    layout = random_layout(2, 3, 3, empty_row=False)
    ops = torch.ops.efficient_attention
    row = BlockMask.from_layout(layout, 8).tables()["row"]
    row1 = BlockMask.from_layout(layout[:1], 8).tables()["row"]
    tiled = BlockMask.from_pattern("strided", 19, 8, 2, causal=True, local_attn_ctx=3)
    row_t = tiled.tables()["row"]
    # causal linear attention (features >= 0): with decay and normaliser, with an initial state and neither
    qf, kf, decay = q.abs(), k.abs(), -torch.rand(2, 2, 19)
    h0 = torch.rand(2, 2, 8, 8)
    states = ops.linear_causal_fwd(qf, kf, v, decay, None, None, True, 8)[2]
    grads = (torch.randn_like(v), torch.randn(2, 2, 19), None, torch.randn(2, 2, 8))
    # cosFormer's features made in the kernel from raw q, k (4 channels -> 8 features) and a (T, 2) cos/sin table
    cos_sin, q4, k4 = torch.rand(19, 2), q[..., :4].contiguous(), k[..., :4].contiguous()
    states4 = ops.linear_causal_fwd(q4, k4, v, None, None, None, True, 8, cos_sin, 1)[2]
    landmark = ops.landmark_fwd(q, k, v, kpm, 4, 0.3)  # (out, lse) for the backward
    return [
        (ops.sliding_window_fwd.default, (q, k, v, kpm, 1, 4, 2, False, 0, 0.3)),
        (ops.sliding_window_fwd.default, (q, k, v, None, 4, 4, 0, True, 0, 0.3)),
        (ops.block_sparse_fwd.default, (q, k, v, *row, None, 8, True, kpm, 0.3)),
        (ops.block_sparse_fwd.default, (q, k, v, *row1[:2], None, None, 8, False, None, 0.3)),
        (ops.block_sparse_fwd.default, (q, k, v, *row_t, tiled.tables()["tiles"], 8, tiled.causal, kpm, 0.3)),
        (ops.linear_causal_fwd.default, (qf, kf, v, decay, None, None, True, 8)),
        (ops.linear_causal_fwd.default, (qf, kf, v, None, h0, None, False, 5)),
        (ops.linear_causal_bwd.default, (*grads, qf, kf, v, decay, states, True, 8)),
        (ops.linear_causal_fwd.default, (q4, k4, v, None, None, None, True, 8, cos_sin, 0)),
        (ops.linear_causal_bwd.default, (*grads[:2], None, None, q4, k4, v, None, states4, True, 8, cos_sin, 1)),
        (ops.landmark_fwd.default, (q, k, v, kpm, 4, 0.3)),
        (ops.landmark_bwd.default, (torch.randn_like(v), None, q, k, v, *landmark, kpm, 4, 0.3)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args = _op_samples()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_smoke():
    q, k, v = make_qkv(1, 2, 40, 40, 8, torch.float32)
    layout = random_layout(2, 3, 3, empty_row=False)
    window = LocalWindow.sliding(6, 0, causal=True)

    def fn(q, k, v):
        a, lse_a = sliding_window_attention(q, k, v, window)
        b, lse_b = block_sparse_attention(q, k, v, layout, 16, causal=True)
        return a + b, lse_a + lse_b

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    ref, ref_lse = fn(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dispatch_reasons_and_fallback(caplog):
    q, k, v = make_qkv(1, 2, 16, 16, 8, torch.float32)
    reasons = not_supported_reasons("sliding_window", q, k, v)
    assert reasons["cpp"] == []
    assert any("not CUDA" in r for r in reasons["triton"])
    r = not_supported_reasons("block_sparse", q, k, v, dropout_p=0.1)
    assert any("dropout" in x for x in r["cpp"])
    qi = torch.zeros(1, 2, 16, 8, dtype=torch.int32)
    assert any("dtype" in x for x in not_supported_reasons("sliding_window", qi, qi, qi)["cpp"])
    with pytest.raises(ValueError, match="op must be"):
        not_supported_reasons("dense", q, k, v)
    # dropout falls back to the reference path, says why once, and still gives gradients
    with caplog.at_level(logging.WARNING, logger="efficient_attention.kernels.dispatch"):
        torch.manual_seed(0)
        out, _ = sliding_window_attention(q, k, v, LocalWindow.sliding(3, 3), dropout_p=0.5)
        sliding_window_attention(q, k, v, LocalWindow.sliding(3, 3), dropout_p=0.5)
    logged = [rec for rec in caplog.records if "dropout_p=0.5" in rec.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING  # once, at WARNING, with the reason
    out.sum().backward()


def test_bad_inputs():
    q, k, v = make_qkv(1, 2, 16, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="layout must have shape"):
        block_sparse_attention(q, k, v, torch.ones(2, 3, 2, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, torch.ones(2, 2, 2, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        sliding_window_attention(q, k, v, LocalWindow.sliding(2), key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="window"):
        sliding_window_attention(q, k, v, 3)


def test_row_positions_are_checked_and_run_on_the_reference_path(caplog):
    """``q_pos``: a ValueError naming it for a bad shape, dtype, device or a q_offset beside it; the C++ kernels say
    they cannot take it (forcing them raises), so on the CPU the reference path runs it, equal to float64 explicit
    softmax over each row's band, gradients too."""
    q, k, v = make_qkv(2, 2, 20, 50, 16, torch.float32, hkv=1)
    window = LocalWindow.sliding(50, 0, causal=True)
    pos = row_positions(2, 2, 20, 50, "fillers")
    for bad, match in (
        (pos[:, :1], r"q_pos must have shape \(B, H, T\)"),
        (pos.long(), "q_pos must be int32"),
        (pos.to("meta"), "q_pos must be on q's device"),
        (pos.tolist(), "q_pos must be a Tensor"),
    ):
        with pytest.raises(ValueError, match=match):
            sliding_window_attention(q, k, v, window, q_pos=bad)
    with pytest.raises(ValueError, match="q_offset must be 0 when q_pos"):
        sliding_window_attention(q, k, v, window, q_pos=pos, q_offset=3)
    reasons = not_supported_reasons("sliding_window", q, k, v, positions=True)
    assert any("q_pos" in r for r in reasons["cpp"]) and reasons["reference"] == []
    assert not_supported_reasons("sliding_window", q, k, v)["cpp"] == []
    with pytest.raises(ValueError, match="backend='cpp' cannot run sliding_window.*q_pos"):
        sliding_window_attention(q, k, v, window, q_pos=pos, backend="cpp")
    assert choose_backend("sliding_window", q, k, v, positions=True) == "reference"
    kpm = padding(2, 50)
    with caplog.at_level(logging.WARNING, logger="efficient_attention.kernels.dispatch"):
        out, lse = sliding_window_attention(q, k, v, window, q_pos=pos, key_padding_mask=kpm)
    assert any("q_pos" in rec.getMessage() for rec in caplog.records)  # why not the C++ kernels, said once
    ref_out, ref_lse, ref_in = ref_positions(q, k, v, window, pos, kpm)
    _compare(out, lse, ref_out, ref_lse, torch.float32)
    for got, want in zip(loss_and_grads(out, lse, (q, k, v)), loss_and_grads(ref_out, ref_lse, ref_in)):
        _close(got, want, GRAD_TOL[torch.float32])


def test_package_works_without_the_extension():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from efficient_attention.kernels import sliding_window_attention, not_supported_reasons\n"
        "from efficient_attention.local_window import LocalWindow\n"
        "q = torch.randn(1, 2, 9, 4)\n"
        "out, lse = sliding_window_attention(q, q, q, LocalWindow.sliding(2))\n"
        "print('REASON', not_supported_reasons('sliding_window', q, q, q)['cpp'])\n"
    )
    env = dict(os.environ, PYTHONPATH=root, EA_DISABLE_KERNELS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "EA_DISABLE_KERNELS" in res.stdout
    assert res.stderr.count("using the PyTorch reference path on the CPU") == 1


@pytest.mark.parametrize("op", ["sliding_window", "block_sparse"])
def test_arguments_the_kernels_cannot_compute_are_rejected(op):
    q, k, v = make_qkv(1, 2, 16, 16, 8, torch.float32)
    layout = torch.ones(2, 1, 1, dtype=torch.bool)

    def call(q=q, k=k, v=v, **kw):
        if op == "sliding_window":
            return sliding_window_attention(q, k, v, LocalWindow.sliding(3, 0), **kw)
        return block_sparse_attention(q, k, v, layout, kw.pop("block_size", 16), **kw)

    qi = torch.ones(1, 2, 16, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        call(q=qi, k=qi, v=qi)
    with pytest.raises(TypeError, match="dtype"):
        call(k=k.double())
    with pytest.raises(ValueError, match="dropout_p"):
        call(dropout_p=-0.5)
    with pytest.raises(ValueError, match="q must be 4-D"):
        call(q=q[0])
    with pytest.raises(ValueError, match="head dims"):
        call(k=k[..., :4])
    with pytest.raises(ValueError, match="key_padding_mask"):
        call(key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    if op == "sliding_window":
        with pytest.raises(TypeError, match="q_offset"):
            call(q_offset=1.5)
    else:
        for bad in (4.9, "4"):
            with pytest.raises(TypeError, match="block_size"):
                call(block_size=bad)
