"""The Triton GPU kernels against the float64 reference (skipped without CUDA + Triton).

Run on the device with ``pytest tests/test_kernels_gpu.py``; the last run is recorded
in ``benchmarks/README.md``.
"""

import pytest
import torch
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
from efficient_attention.kernels import block_sparse_attention, choose_backend, sliding_window_attention
from efficient_attention.kernels.dispatch import triton_reason
from efficient_attention.local_window import LocalWindow

pytestmark = pytest.mark.skipif(
    triton_reason() is not None, reason=f"Triton GPU kernels unavailable: {triton_reason()}"
)

# relative error bounds ||x - ref|| / ||ref|| per input dtype (fp32 runs the dots in IEEE fp32)
REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(params=["tma", "pointers"])
def loads(request, monkeypatch):
    """Runs a test with each way of loading tiles: TMA descriptors (Hopper) or masked pointer loads."""
    from efficient_attention.kernels import triton_ops

    for name in ("window_config", "block_config"):
        base = getattr(triton_ops, name)

        def cfg(*a, base=base):
            return {key: dict(val, TMA=request.param == "tma") for key, val in base(*a).items()}

        monkeypatch.setattr(triton_ops, name, cfg)
    return request.param


def _rel(got, ref):
    got, ref = got.double(), ref.double().to(got.device)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    return ((got[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def _check(out, lse, ref_out, ref_lse, inputs, ref_inputs, dtype):
    assert not torch.isnan(out).any()
    assert _rel(out, ref_out) < REL[dtype]
    assert _rel(lse, ref_lse) < 1e-5
    for got, want in zip(loss_and_grads(out, lse, inputs), loss_and_grads(ref_out, ref_lse, ref_inputs)):
        assert not torch.isnan(got).any()
        assert _rel(got, want) < 3 * REL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [32, 64, 128])
# the last two windows take the wide-band tiles (span > 512 / > 1024 keys) of triton_ops.window_config
@pytest.mark.parametrize(
    "window",
    WINDOWS[:5]
    + [
        LocalWindow.sliding(300, 0, causal=True),
        LocalWindow.sliding(600, 0),
        LocalWindow.sliding(1100, 0, causal=True),
    ],
    ids=str,
)
def test_triton_sliding_window(window, d, dtype, loads):
    S = 333
    q_offset = 5 if window.group == 1 else 0
    q, k, v = make_qkv(2, 4, S - q_offset, S, d, dtype, device="cuda", hkv=2, seed=d)
    kpm = padding(2, S, device="cuda")
    assert choose_backend("sliding_window", q, k, v) == "triton"
    out, lse = sliding_window_attention(q, k, v, window, q_offset=q_offset, key_padding_mask=kpm)
    ref_out, ref_lse, ref_in = ref_sliding(q, k, v, window, q_offset=q_offset, key_padding_mask=kpm)
    _check(out, lse, ref_out, ref_lse, (q, k, v), ref_in, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_block_sparse(bs, d, dtype, causal, loads):
    T, S = 7 * bs - 3, 7 * bs - 3
    q, k, v = make_qkv(2, 3, T, S, d, dtype, device="cuda", seed=bs + d)
    layout = random_layout(3, 7, 7, seed=bs).cuda()
    kpm = padding(2, S, device="cuda")
    out, lse = block_sparse_attention(q, k, v, layout, bs, causal=causal, key_padding_mask=kpm)
    ref_out, ref_lse, ref_in = ref_block(q, k, v, layout, bs, causal=causal, key_padding_mask=kpm)
    _check(out, lse, ref_out, ref_lse, (q, k, v), ref_in, dtype)


def test_triton_layout_tables_follow_in_place_changes():
    """The per-layout lookup tables are cached; changing the layout in place must not reuse them."""
    q, k, v = make_qkv(1, 2, 128, 128, 32, torch.float16, device="cuda")
    layout = random_layout(2, 2, 2, empty_row=False).cuda()
    block_sparse_attention(q, k, v, layout, 64)
    layout[:, 0, 1] = ~layout[:, 0, 1]
    out, lse = block_sparse_attention(q, k, v, layout, 64)
    ref_out, ref_lse, _ = ref_block(q, k, v, layout, 64)
    assert _rel(out, ref_out) < REL[torch.float16]
    assert _rel(lse, ref_lse) < 1e-5


def test_triton_fallback_reasons():
    q = torch.randn(1, 2, 64, 48, device="cuda", dtype=torch.bfloat16)
    assert choose_backend("sliding_window", q, q, q) == "reference"
    out, _ = sliding_window_attention(q, q, q, LocalWindow.sliding(8))
    assert out.shape == q.shape


def test_triton_compile_fullgraph():
    q, k, v = make_qkv(1, 2, 256, 256, 64, torch.bfloat16, device="cuda")
    layout = random_layout(2, 4, 4, empty_row=False).cuda()

    def fn(q, k, v):
        a, _ = sliding_window_attention(q, k, v, LocalWindow.sliding(32, 0, causal=True))
        b, _ = block_sparse_attention(q, k, v, layout, 64)
        return a + b

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    compiled(q, k, v).sum().backward()


def test_triton_opcheck():
    from efficient_attention.kernels import triton_ops  # noqa: F401

    # the forward kernels as registered ops (their autograd is ops.py's autograd.Function, tested above)
    q, k, v = (x.detach() for x in make_qkv(1, 2, 100, 100, 32, torch.float16, device="cuda"))
    kpm = padding(1, 100, device="cuda")
    layout = random_layout(2, 2, 2, empty_row=False).cuda()
    ops = torch.ops.efficient_attention
    torch.library.opcheck(ops.triton_sliding_window.default, (q, k, v, kpm, 1, 16, 0, True, 0, 0.2))
    t = BlockMask.from_layout(layout, 64).tables()
    torch.library.opcheck(
        ops.triton_block_sparse.default, (q, k, v, *t["row"], *t["col"], t["tiles"], 64, False, None, 0.2)
    )
    tiled = BlockMask.from_pattern("strided", 100, 64, 2, causal=True, local_attn_ctx=7, device="cuda")
    t = tiled.tables()
    torch.library.opcheck(
        ops.triton_block_sparse.default, (q, k, v, *t["row"], *t["col"], t["tiles"], 64, True, kpm, 0.2)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "pattern,bs,kw",
    [
        ("strided", 64, dict(local_attn_ctx=37)),
        ("sliding", 128, dict(window=90)),
        ("fixed", 16, dict(local_attn_ctx=80)),
        ("dilated", 32, dict(window=96)),
    ],
)
def test_triton_block_mask_partial_blocks(pattern, bs, kw, dtype):
    T = 300
    bm = BlockMask.from_pattern(pattern, T, bs, 2, causal=True, device="cuda", **kw)
    q, k, v = make_qkv(2, 2, T, T, 64, dtype, device="cuda")
    kpm = padding(2, T, device="cuda")
    assert choose_backend("block_sparse", q, k, v, block_size=bs) == "triton"
    out, lse = block_sparse_attention(q, k, v, bm, key_padding_mask=kpm)
    ref_out, ref_lse, ref = ref_block(q, k, v, bm, None, key_padding_mask=kpm)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    for got, want in zip(loss_and_grads(out, lse, (q, k, v)), loss_and_grads(ref_out, ref_lse, ref)):
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------ rows at their own positions (q_pos)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("kind", ["spread", "fillers", "edges", "repeats"])
# a causal band over every key (ProbSparse's, the wide-band tiles), a short causal band (thin tiles), a two-sided one
@pytest.mark.parametrize(
    "window",
    [LocalWindow.sliding(1000, 0, causal=True), LocalWindow.sliding(40, 0, causal=True), LocalWindow.sliding(17, 5)],
    ids=str,
)
def test_triton_rows_at_their_own_positions(window, kind, d, dtype, loads):
    """``q_pos`` (nondecreasing per head; tiles of mixed and repeated positions, rows at position 0, rows on key-tile
    edges) against float64 explicit softmax with the dense mask of those positions, with key padding."""
    T, S = 333, 1000
    q, k, v = make_qkv(2, 4, T, S, d, dtype, device="cuda", hkv=2, seed=d)
    q_pos = row_positions(2, 4, T, S, kind, device="cuda")
    kpm = padding(2, S, device="cuda")
    assert choose_backend("sliding_window", q, k, v, positions=True) == "triton"
    out, lse = sliding_window_attention(q, k, v, window, q_pos=q_pos, key_padding_mask=kpm)
    ref_out, ref_lse, ref_in = ref_positions(q, k, v, window, q_pos, kpm)
    _check(out, lse, ref_out, ref_lse, (q, k, v), ref_in, dtype)


def test_triton_positions_compile_and_opcheck():
    from efficient_attention.kernels import triton_ops  # noqa: F401

    q, k, v = make_qkv(1, 2, 100, 300, 64, torch.bfloat16, device="cuda")
    q_pos = row_positions(1, 2, 100, 300, "fillers", device="cuda")
    window = LocalWindow.sliding(300, 0, causal=True)

    def fn(q, k, v, pos):
        return sliding_window_attention(q, k, v, window, q_pos=pos)[0]

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, q_pos), fn(q, k, v, q_pos))
    compiled(q, k, v, q_pos).float().sum().backward()
    ops = torch.ops.efficient_attention
    args = (q.detach(), k.detach(), v.detach(), None, 1, 300, 0, True, 0, 0.125, q_pos)
    torch.library.opcheck(ops.triton_sliding_window.default, args)


def _probsparse_step(kernel: bool, length: int, monkeypatch, batch: int = 2):
    """A bf16-autocast causal ProbSparse training step (8 heads of 64), its active rows on the positions kernel or
    (``kernel=False``) on the SDPA path with the kept mask; the same key samples.  Returns ``(out, grads, held, peak)``:
    the bytes the forward leaves alive for the backward and the step's peak, both beyond what was live before."""
    from efficient_attention import ProbSparse
    from efficient_attention.attentions import probsparse

    calls = []
    take = probsparse._kernel_rows
    monkeypatch.setattr(probsparse, "_kernel_rows", lambda *a: calls.append(1) or take(*a))
    monkeypatch.setattr(probsparse, "KERNEL_MIN_KEYS", 0)  # these lengths would take SDPA by the length rule
    if not kernel:
        monkeypatch.setattr(probsparse, "_kernel_reasons", lambda *a: ["the SDPA path, forced"])
    torch.manual_seed(0)
    m = ProbSparse(512, 8, causal=True).cuda().train()
    x = torch.randn(length, batch, 512, device="cuda", requires_grad=True)
    g = torch.randn(length, batch, 512, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x, need_weights=False)[0]
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    (out.float() * g).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    monkeypatch.undo()
    assert bool(calls) == kernel
    # (k_proj.bias left out: its true gradient is 0, a key bias shifts each row's scores by a constant)
    grads = [("x", x.grad)] + [(n, p.grad) for n, p in m.named_parameters() if n != "k_proj.bias"]
    return out, grads, held, peak


@pytest.mark.parametrize("length", [200, 1000])
def test_probsparse_causal_rows_on_the_positions_kernel_match_the_sdpa_path(length, monkeypatch):
    """Causal ProbSparse takes the positions kernel on CUDA (no padding, no dropout): its bf16 training step equals
    the SDPA path's (kept additive mask) to bf16 rounding, output and every gradient."""
    out, grads, *_ = _probsparse_step(True, length, monkeypatch)
    ref, ref_grads, *_ = _probsparse_step(False, length, monkeypatch)
    assert _rel(out, ref) < REL[torch.bfloat16]
    for (name, got), (_, want) in zip(grads, ref_grads):
        assert _rel(got, want) < 3 * REL[torch.bfloat16], name


def test_probsparse_causal_positions_kernel_keeps_no_row_mask(monkeypatch):
    """The point of the kernel path: no (B, H, A, S) mask is kept for the backward, so the forward leaves less alive
    than the SDPA path's (by at least that mask, B * H * A * S bf16 bytes, A >= u(S) active rows), and the step's
    peak is no higher.  (The peak alone cannot tell: at 4k the mask is a few MiB and the peak comes later, in the
    projections' backward, where both paths hold the same.)"""
    from efficient_attention.attentions.probsparse import log_count

    for kernel in (True, False):  # warm-up: the first bf16 products allocate cuBLAS's workspace (tens of MiB)
        _probsparse_step(kernel, 4096, monkeypatch)
    *_, held, peak = _probsparse_step(True, 4096, monkeypatch)
    *_, ref_held, ref_peak = _probsparse_step(False, 4096, monkeypatch)
    mask = 2 * 8 * log_count(5, 4096) * 4096 * 2
    assert held + mask <= ref_held, (held / 2**20, ref_held / 2**20, mask / 2**20)
    assert peak <= ref_peak, (peak / 2**20, ref_peak / 2**20)


# ------------------------------------------------------------------------------ chunked linear attention
def _linear_inputs(T, S, m, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.rand(2, 3, T, m, device="cuda", generator=g).to(dtype)
    k = torch.rand(2, 3, S, m, device="cuda", generator=g).to(dtype)
    v = torch.randn(2, 3, S, d, device="cuda", generator=g).to(dtype)
    decay = -torch.rand(2, 3, S, device="cuda", generator=g) * 0.1
    state = (torch.rand(2, 3, m, d, device="cuda", generator=g), torch.rand(2, 3, m, device="cuda", generator=g))
    kpm = padding(2, S, device="cuda")
    return q, k, v, decay, state, kpm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
# m = 2 (not 1) for the zero-padded few-features path: with one feature the normalised output does not depend
# on q, so dq is exactly 0 in float64 and the kernel's rounding-level cancellation would be measured against 0
@pytest.mark.parametrize("m,d", [(16, 64), (64, 64), (130, 32), (256, 128), (2, 16)])
@pytest.mark.parametrize("T,S", [(1, 1), (200, 200), (100, 333)])
@pytest.mark.parametrize("decay", [False, True])
def test_triton_linear_attention(decay, T, S, m, d, dtype):
    from efficient_attention.errors import BackendUnavailableError
    from efficient_attention.kernels.linear_attention import LINEAR_MIN_POSITIONS, linear_attention

    q, k, v, log_decay, state, kpm = _linear_inputs(T, S, m, d, dtype)
    log_decay = log_decay if decay else None
    fast = "triton" if T >= LINEAR_MIN_POSITIONS else "chunked"  # a decoding-sized call stays on PyTorch
    assert choose_backend("linear_attention", q, k, v) == fast
    if fast == "chunked":
        with pytest.raises(BackendUnavailableError, match="fewer than"):
            linear_attention(q, k, v, causal=True, backend="triton")
    outs = []
    for backend, cast in ((fast, lambda x: x), ("reference", lambda x: x.double())):
        ins = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        h0 = cast(state[0]).detach().requires_grad_()
        out, (h, z) = linear_attention(
            *ins,
            causal=True,
            log_decay=None if log_decay is None else cast(log_decay),
            key_padding_mask=kpm,
            initial_state=(h0, cast(state[1])),
            return_state=True,
            backend=backend,
        )
        gen = torch.Generator(device="cuda").manual_seed(1)
        w = torch.randn(out.shape, device="cuda", generator=gen, dtype=torch.float64).to(out.dtype)
        grads = torch.autograd.grad((out * w).sum() + h.sum() + z.sum(), (*ins, h0))
        outs.append([out, h, z, *grads])
    for got, want in zip(*outs):
        assert not torch.isnan(got).any()
        # relative to the larger of the reference and 1: a gradient that is exactly 0 in float64 (one key
        # normalised by itself) comes out at rounding level, which a plain relative error would call wrong
        err = (got.double() - want.double().to(got.device)).norm() / max(want.double().norm().item(), 1.0)
        assert err < 3 * REL[dtype]


@pytest.mark.parametrize(
    "name,opts", [("performer", dict(approx_attn_dim=64)), ("cosformer", dict(max_len=1024)), ("abc", {})]
)
def test_triton_linear_family_matches_float64(name, opts):
    from efficient_attention import build_attention

    torch.manual_seed(0)
    m = build_attention(name, embed_dim=128, num_heads=4, causal=True, self_attention=True, **opts).cuda().eval()
    x = torch.randn(300, 2, 128, device="cuda")
    out = m(x, x, x, need_weights=False)[0]
    state = {}
    steps = [m(x[:200], x[:200], x[:200], incremental_state=state, need_weights=False)[0]]
    for t in range(200, 300):
        steps.append(m(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state, need_weights=False)[0])
    ref = m.double()(x.double(), x.double(), x.double(), need_weights=False)[0]
    assert _rel(out, ref) < 1e-5
    assert _rel(torch.cat(steps), ref) < 1e-5


@pytest.mark.parametrize("embed_dim", [256, 128, 64])  # head dims 64, 32, 16
@pytest.mark.parametrize(
    "name,causal", [("performer", False), ("performer", True), ("cosformer", False), ("cosformer", True)]
)
def test_linear_family_bf16_training_step_matches_float64(name, causal, embed_dim, monkeypatch):
    """A bf16-autocast training step against float64 through the hand-written backwards: Performer's key gradient
    made in slices of positions (several here), cosFormer's feature gradients from the products' halves (noncausal)
    and from the Triton kernels that make its features (causal; head dims 32 and 16 once gave wrong results
    there, see ``linear_attention._config``)."""
    from efficient_attention import build_attention
    from efficient_attention.attentions import cosformer, performer

    monkeypatch.setattr(performer, "KEY_GRAD_SLICE", 4096)  # 16 positions per slice at this size
    fused, calls = cosformer._causal_triton, []
    monkeypatch.setattr(cosformer, "_causal_triton", lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(0)
    m = build_attention(name, embed_dim=embed_dim, num_heads=4, causal=causal, self_attention=True).cuda().train()
    x = torch.randn(300, 2, embed_dim, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x, x, x, need_weights=False)[0]
    g = torch.randn(out.shape, device="cuda")
    (out.float() * g).sum().backward()
    xd = x.detach().double().requires_grad_()
    ref = m.double().eval()(xd, xd, xd, need_weights=False)[0]  # eval: no feature redraw
    (ref * g.double()).sum().backward()
    assert _rel(out, ref) < 3e-2
    assert _rel(x.grad, xd.grad) < 5e-2
    assert bool(calls) == (name == "cosformer" and causal)  # the features made in the kernels


def test_triton_linear_attention_compile_and_opcheck():
    from efficient_attention.kernels.linear_attention import linear_attention

    q, k, v, decay, state, kpm = _linear_inputs(150, 150, 32, 64, torch.bfloat16)

    def fn(q, k, v):
        return linear_attention(q, k, v, causal=True, log_decay=decay, key_padding_mask=kpm)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    ops = torch.ops.efficient_attention
    h0, z0 = state[0].contiguous(), state[1].contiguous()
    for normalize, time_first in ((True, True), (False, False)):  # normalised in-kernel, time-first bf16 / plain
        args = (q.detach(), k.detach(), v.detach(), decay, h0, z0, normalize, torch.bfloat16, time_first)
        torch.library.opcheck(ops.triton_linear_attention.default, args)  # (autograd: _LinearFn, tested above)
    # cosFormer's features made in the kernels: raw time-first rows and a (T, 2) cos/sin table
    theta = torch.arange(150, device="cuda") * (torch.pi / 300)
    cos_sin = torch.stack([theta.cos(), theta.sin()], -1)
    for dim, act in ((64, 0), (64, 1), (32, 0)):
        raw = torch.randn(150, 2, 2, dim, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
        vv = torch.randn(2, 2, 150, dim, device="cuda", dtype=torch.bfloat16)
        args = (raw, raw * 0.5, vv, None, None, None, True, torch.bfloat16, True, cos_sin, act)
        torch.library.opcheck(ops.triton_linear_attention.default, args)
    # the backward op's fake gives each gradient its input's layout (time-first raw rows: time-first dq, dk)
    raw = torch.randn(150, 2, 2, 64, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
    vv = torch.randn(2, 2, 150, 64, device="cuda", dtype=torch.bfloat16)
    h0, z0 = torch.rand(2, 2, 128, 64, device="cuda"), torch.rand(2, 2, 128, device="cuda")
    o, den, _, _ = ops.triton_linear_attention(raw, raw * 0.5, vv, None, h0, z0, True, torch.bfloat16, True, cos_sin, 0)
    args = (torch.randn_like(o), None, None, raw, raw * 0.5, vv, None, h0, z0, o, den, True, cos_sin, 0)
    torch.library.opcheck(ops.triton_linear_attention_bwd.default, args)


# -- landmark attention (efficient_attention.kernels.landmark) ------------------------------------------------
def _landmark_ref(q, k, v, bs, kpm):
    from efficient_attention.kernels import landmark_attention

    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = landmark_attention(*ref, bs, key_padding_mask=kpm, backend="reference")
    return out, lse, ref


# (dtype, head dim, block size): every block size and head dim in bf16, the other dtypes on fewer
# (each combination compiles three kernels); fp32 with 128 x 128 tiles takes the PyTorch path
LANDMARK_CASES = (
    [(torch.bfloat16, d, bs) for d in (32, 64, 128) for bs in (16, 32, 64, 128)]
    + [(torch.float16, 64, bs) for bs in (16, 64, 128)]
    + [(torch.float16, 128, 64)]
    + [(torch.float32, 64, 32), (torch.float32, 64, 64), (torch.float32, 128, 64), (torch.float32, 128, 128)]
)


@pytest.mark.parametrize("dtype,d,bs", LANDMARK_CASES, ids=str)
@pytest.mark.parametrize("tail", [False, True], ids=["T=S", "last T of S"])
def test_triton_landmark(bs, d, dtype, tail):
    from efficient_attention.kernels import landmark_attention
    from efficient_attention.kernels.dispatch import choose_landmark_backend
    from efficient_attention.kernels.landmark import LANDMARK_FP32_TILE

    S = 5 * bs + 7
    T = S - 2 * bs - 3 if tail else S
    q, k, v = make_qkv(2, 4, T, S, d, dtype, device="cuda", hkv=2, seed=bs + d)
    kpm = padding(2, S, device="cuda")
    kpm[1, 2 * bs - 1] = True  # a padded landmark hides its block
    fits = dtype != torch.float32 or bs * d <= LANDMARK_FP32_TILE
    assert choose_landmark_backend(q, k, v, bs) == ("triton" if fits else "reference")
    out, lse = landmark_attention(q, k, v, bs, key_padding_mask=kpm)
    ref_out, ref_lse, ref_in = _landmark_ref(q, k, v, bs, kpm)
    _check(out, lse, ref_out, ref_lse, (q, k, v), ref_in, dtype)


def test_triton_landmark_fp16_large_inputs():
    from efficient_attention.kernels import landmark_attention

    q, k, v = (x.detach().mul(30).requires_grad_() for x in make_qkv(1, 2, 200, 200, 64, torch.float16, device="cuda"))
    out, lse = landmark_attention(q, k, v, 64)
    ref_out, ref_lse, ref_in = _landmark_ref(q, k, v, 64, None)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel(out, ref_out) < REL[torch.float16]
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_triton_landmark_module_matches_cpu():
    import efficient_attention as ea

    torch.manual_seed(0)
    m = ea.LandmarkAttention(128, 2, causal=True, block_size=64)
    x = torch.randn(300, 2, 128)
    want, _ = m(x, x, x, need_weights=False)
    got, _ = m.cuda()(x.cuda(), x.cuda(), x.cuda(), need_weights=False)
    assert _rel(got, want) < 1e-5


def test_triton_landmark_compile_and_opcheck():
    from efficient_attention.kernels import landmark, landmark_attention

    q, k, v = make_qkv(1, 2, 200, 200, 64, torch.bfloat16, device="cuda")
    fn = torch.compile(lambda q, k, v: landmark_attention(q, k, v, 64)[0], fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), landmark_attention(q, k, v, 64)[0])
    fn(q, k, v).sum().backward()
    kpm = padding(1, 200, device="cuda")
    torch.library.opcheck(landmark.triton_landmark, (q.detach(), k.detach(), v.detach(), kpm, 64, 0.125))


# -- Nyströmformer's landmark core (efficient_attention.kernels._triton_nystrom) ------------------------------
@pytest.mark.parametrize("c, d", [(16, 64), (64, 64), (10, 24), (40, 128)])
def test_triton_nystrom_core_matches_float64(c, d):
    from efficient_attention.attentions import nystrom
    from efficient_attention.kernels._triton_nystrom import NystromCore

    torch.manual_seed(0)
    ins = [(torch.randn(6, c, d, device="cuda") * 0.5).requires_grad_() for _ in range(3)]
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    g = torch.randn(6, c, d, device="cuda")
    out = NystromCore.apply(*ins, 6)
    out.backward(g)
    kernel2 = torch.softmax(ref_in[0] @ ref_in[1].transpose(1, 2), -1)
    ref = nystrom.iterative_pinv(kernel2, 6, stochastic=True) @ ref_in[2]
    ref.backward(g.double())
    assert _rel(out, ref) < 1e-4
    for got, want in zip(ins, ref_in):
        assert _rel(got.grad, want.grad) < 1e-4


def test_triton_nystrom_module_runs_the_core_and_matches_float64():
    from efficient_attention import NystromAttention
    from efficient_attention.attentions import nystrom

    torch.manual_seed(0)
    m = NystromAttention(256, 4, num_landmarks=64).cuda().train()
    x = torch.randn(1024, 2, 256, device="cuda", requires_grad=True)
    out = m(x, x, x, need_weights=False)[0]
    out.sum().backward()
    assert "failed" not in nystrom._TRITON_CORE, nystrom._TRITON_CORE
    x64 = x.detach().double().requires_grad_()
    ref = m.double()(x64, x64, x64, need_weights=False)[0]
    ref.sum().backward()
    assert _rel(out, ref) < 1e-4 and _rel(x.grad, x64.grad) < 1e-4


# -- cosFormer's noncausal features (efficient_attention.kernels._triton_cosformer) ------------------------------
@pytest.mark.parametrize("act", ["relu", "elu"])
@pytest.mark.parametrize(
    "dtype, out_dtype", [(torch.float32,) * 2, (torch.float16, torch.float32), (torch.bfloat16,) * 2]
)
@pytest.mark.parametrize("d", [24, 64, 128])
def test_triton_cos_features_match_aten(act, dtype, out_dtype, d):
    """The one-kernel features equal the two ATen kernels' (same fp32 product, rounded once) to one rounding."""
    from efficient_attention.attentions import cosformer

    x = torch.randn(1000, 2, 3, d, device="cuda").to(dtype).permute(1, 2, 0, 3)  # the heads of a time-first input
    table = cosformer._cos_sin(1000, 1200, x.device, torch.float32, out_dtype)[0]
    assert cosformer._triton_features_ok(x, table, out_dtype)
    got = cosformer._features(x, table, act, out_dtype)
    a = torch.relu(x) if act == "relu" else 1.0 + torch.nn.functional.elu(x.float())
    want = (a.unsqueeze(-2) * table).to(out_dtype).reshape(got.shape)
    torch.testing.assert_close(got, want, rtol=1e-6 if out_dtype == torch.float32 else 8e-3, atol=1e-6)


def test_cosformer_noncausal_module_takes_the_feature_kernel_and_matches_float64(monkeypatch):
    from efficient_attention import build_attention
    from efficient_attention.kernels import _triton_cosformer

    calls = []
    real = _triton_cosformer.cos_features
    monkeypatch.setattr(_triton_cosformer, "cos_features", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = build_attention("cosformer", embed_dim=256, num_heads=4, self_attention=True).cuda()
    x = torch.randn(1000, 2, 256, device="cuda", requires_grad=True)
    out = m(x, x, x, need_weights=False)[0]
    out.pow(2).sum().backward()
    assert len(calls) == 4, "features: the query's and the key's, forward and recomputed in the backward"
    x64 = x.detach().double().requires_grad_()
    ref = m.double()(x64, x64, x64, need_weights=False)[0]
    ref.pow(2).sum().backward()
    assert _rel(out, ref) < 1e-5 and _rel(x.grad, x64.grad) < 1e-5


def _record_calls(monkeypatch, module, names) -> list:
    """The names of ``module``'s functions ``names`` in the order they are called (each still runs)."""
    calls: list = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


# -- causal ABC's slot weights and slot read (efficient_attention.kernels._triton_abc) ----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_abc_fused_slots_training_step_matches_aten_and_float64(dtype, dropout, monkeypatch):
    """A causal ABC training step at 8k positions (many scan blocks) with its slot tensors on the Triton kernels
    equals the same step on the ATen ops (the same dropout draws) and, in fp32 without dropout, its float64 self."""
    from efficient_attention import build_attention
    from efficient_attention.attentions import abc
    from efficient_attention.kernels import _triton_abc

    calls = _record_calls(
        monkeypatch, _triton_abc, ("slot_weights", "slot_weights_grad", "slot_read", "slot_read_grad")
    )
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(abc, "_fused_slots", lambda *a: False)
        torch.manual_seed(0)
        m = build_attention("abc", embed_dim=256, num_heads=4, causal=True, self_attention=True, dropout=dropout)
        m = m.cuda().train()
        x = torch.randn(8192, 2, 256, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = m(x, x, x, need_weights=False)[0]
        params = [p for n, p in m.named_parameters() if n != "k_proj.bias"]  # (its gradient is exactly zero)
        results.append([out, *torch.autograd.grad(out.float().pow(2).sum(), [x, *params])])
    assert sorted(set(calls)) == ["slot_read", "slot_read_grad", "slot_weights", "slot_weights_grad"], calls
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(*results):
        assert _rel(got, want) < tol
    if dtype == torch.float32 and not dropout:
        x64 = x.detach().double().requires_grad_()
        assert _rel(results[0][0], m.double()(x64, x64, x64, need_weights=False)[0]) < 1e-5


# -- causal S4D's convolution (efficient_attention.kernels._triton_s4d) -------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "identity"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch", [18, 2])
def test_s4d_fused_training_step_matches_pytorch_forms_and_float64(dtype, activation, causal, batch, monkeypatch):
    """An S4D training step at 8k positions on the Triton kernels equals the PyTorch forms (causal: the chunked scan;
    noncausal: the FFT convolution with the kernel over later positions) and, in fp32, its float64 self (20 modes:
    padded to 32 in the kernels; 18 batch rows: two column blocks, one walk each; 2 rows: walks in 8 segments)."""
    from efficient_attention import build_attention
    from efficient_attention.attentions import s4d
    from efficient_attention.kernels import _triton_s4d

    calls = _record_calls(monkeypatch, _triton_s4d, ("s4d_forward", "s4d_backward"))
    monkeypatch.setattr(s4d, "FUSED_MAX_LENGTH", {1: 1 << 30, 2: 1 << 30})  # the kernels at 8k (the policy aside)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(s4d, "_fused_scan", lambda *a: False)
        torch.manual_seed(0)
        m = build_attention("s4d", embed_dim=128, num_heads=4, causal=causal, d_state=20, activation=activation)
        m = m.cuda().train()
        x = torch.randn(8192, batch, 128, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = m(x, x, x, need_weights=False)[0]
        results.append([out, *torch.autograd.grad(out.float().pow(2).sum(), [x, *m.parameters()])])
    assert sorted(set(calls)) == ["s4d_backward", "s4d_forward"], calls
    # fp32: both a few 1e-6 from float64 causal; the bidirectional kernels' two 8k-long walks read 5.5e-5 and
    # 6.4e-5 from the FFT's gradients on an H200 (session 13)
    tol = (5e-5 if causal else 1.5e-4) if dtype == torch.float32 else 2e-2
    for got, want in zip(*results):
        assert _rel(got, want) < tol
    if dtype == torch.float32:
        x64 = x.detach().double().requires_grad_()
        assert _rel(results[0][0], m.double()(x64, x64, x64, need_weights=False)[0]) < 1e-5
