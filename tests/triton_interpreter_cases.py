"""The Triton kernels run by Triton's interpreter on the CPU, against the float64 reference.

Run by ``tests/test_kernels_triton_interpreter.py`` in a subprocess (``TRITON_INTERPRET=1`` must be
set before the kernels are defined, and must not leak into GPU tests of the same session).  Covers
what the GPU tests cover where CI has no GPU: every tile config that ``triton_ops`` can pick (thin,
64x64, long tiles; layout blocks of 16 and 128), TMA descriptor loads and pointer loads, windows with
groups / q_offset / key padding, per-head and shared layouts, gradients through ``out`` and ``lse``,
and a gradient through ``out`` alone; gathered rows at their own positions (``q_pos``: tiles of mixed and
repeated positions, rows at position 0, key blocks no row sees, causal ProbSparse on the kernel against its SDPA
path); the chunked linear-attention kernels (decay, states, padding, value blocks, one feature, several segments,
the in-kernel normaliser) and the causal Performer / cosFormer / ABC running on them.  Exits non-zero with the
failing cases listed.
"""

from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernel_cases import loss_and_grads, make_qkv, padding, random_layout, ref_positions, row_positions  # noqa: E402

from efficient_attention.block_mask import BlockMask  # noqa: E402
from efficient_attention.kernels import landmark, ops, reference, triton_ops  # noqa: E402
from efficient_attention.kernels.linear_attention import linear_attention  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402

REL = {torch.float32: 1e-5, torch.float16: 4e-3}


def rel(got, ref):
    got, ref = got.double(), ref.double()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), "infinite entries differ"
    return ((got[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def check(out, lse, ref_out, ref_lse, inputs, ref_inputs, dtype):
    assert rel(out, ref_out) < REL[dtype], f"out {rel(out, ref_out):.1e}"
    assert rel(lse, ref_lse) < 1e-5, f"lse {rel(lse, ref_lse):.1e}"
    for name, got, want in zip("qkv", loss_and_grads(out, lse, inputs), loss_and_grads(ref_out, ref_lse, ref_inputs)):
        assert rel(got, want) < 3 * REL[dtype], f"d{name} {rel(got, want):.1e}"


def window_case(window, d, dtype, S=150, q_offset=0):
    q, k, v = make_qkv(2, 2, S - q_offset, S, d, dtype, hkv=1, seed=d)
    kpm = padding(2, S)
    k2, v2 = (x.repeat_interleave(2, dim=1) for x in (k, v))  # the ops take q's head count
    out, lse = ops.sliding_window_kernel(
        "triton", q, k2, v2, kpm, window.group, window.left, window.right, window.causal, q_offset, d**-0.5
    )
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.sliding_window_attention(*ref, window, q_offset=q_offset, key_padding_mask=kpm)
    check(out, lse, ref_out, ref_lse, (q, k, v), ref, dtype)


def positions_case(window, d, dtype, T, S, kind, pad=False):
    """Rows at positions ``q_pos`` (:func:`kernel_cases.row_positions`) through the Triton window kernels, against
    float64 explicit softmax with the dense mask of those positions (out, lse, and the gradients of q, k, v);
    ``pad``: key padding too (rows at position 0 then see nothing: lse -inf, out 0)."""
    q, k, v = make_qkv(2, 2, T, S, d, dtype, hkv=1, seed=d + T)
    q_pos = row_positions(2, 2, T, S, kind, seed=T)
    kpm = padding(2, S) if pad else None
    out, lse = ops.sliding_window_attention(q, k, v, window, q_pos=q_pos, key_padding_mask=kpm, backend="triton")
    ref_out, ref_lse, ref = ref_positions(q, k, v, window, q_pos, kpm)
    check(out, lse, ref_out, ref_lse, (q, k, v), ref, dtype)


def probsparse_case(d):
    """Causal ProbSparse in training, its active rows on the Triton kernel with per-row positions, against the same
    module on its SDPA path (the kept additive mask; the same key samples), fp32: output and the gradients of the
    input and of every parameter.  The kernel path must be the one taken."""
    import efficient_attention.attentions.probsparse as ps
    from efficient_attention import ProbSparse

    def run(kernel):
        calls = []
        take, reasons, min_keys = ps._kernel_rows, ps._kernel_reasons, ps.KERNEL_MIN_KEYS
        ps._kernel_rows = lambda *a: calls.append(1) or take(*a)
        ps.KERNEL_MIN_KEYS = 0  # (150 keys: the length rule would send them to SDPA)
        if not kernel:
            ps._kernel_reasons = lambda *a: ["the SDPA path, forced"]
        try:
            torch.manual_seed(0)
            m = ProbSparse(2 * d, 2, causal=True, factor=2).train()
            x = torch.randn(150, 2, 2 * d, requires_grad=True)
            torch.manual_seed(1)  # the same key samples in both runs
            out, _ = m(x, need_weights=False)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        finally:
            ps._kernel_rows, ps._kernel_reasons, ps.KERNEL_MIN_KEYS = take, reasons, min_keys
        assert bool(calls) == kernel, f"kernel path taken: {bool(calls)}"
        return [("out", out), ("dx", x.grad)] + [(n, p.grad) for n, p in m.named_parameters()]

    for (name, got), (_, want) in zip(run(True), run(False)):
        if name == "k_proj.bias":  # its true gradient is 0 (a key bias shifts a row's scores by a constant)
            assert got.abs().max() < 1e-4 and want.abs().max() < 1e-4, f"{name} {got.abs().max():.1e}"
            continue
        assert rel(got, want) < 1e-5, f"{name} {rel(got, want):.1e}"


def layout_case(bs, layout_heads, causal, dtype, d=16):
    T = S = 2 * bs + bs // 2 + 3
    n = -(-T // bs)
    q, k, v = make_qkv(1, 3, T, S, d, dtype, seed=bs)
    layout = random_layout(layout_heads, n, n, density=0.5, seed=bs + layout_heads)
    kpm = padding(1, S)
    out, lse = ops.block_sparse_kernel(
        "triton", q, k, v, _tables(BlockMask.from_layout(layout, bs)), bs, causal, kpm, d**-0.5
    )
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.block_sparse_attention(*ref, layout, bs, causal=causal, key_padding_mask=kpm)
    check(out, lse, ref_out, ref_lse, (q, k, v), ref, dtype)


def _tables(bm):
    t = bm.tables()
    return (*t["row"], *t["col"], t["tiles"])


def time_first(*xs):
    """``(B, H, N, d)`` leaves whose memory is time-first ``(N, B, H, d)``, as ``split_heads`` gives them."""
    return [x.detach().permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_() for x in xs]


def mask_case(pattern, bs, causal, dtype, heads=3, d=16, coarsen=None, batch=1, layout_time_first=False, **kw):
    """A block mask with partial blocks (token tiles, and the causal rule) against the reference."""
    T = S = 2 * max(bs, coarsen or 0) + 21
    bm = BlockMask.from_pattern(pattern, T, bs, heads, causal=causal, **kw)
    assert bm.tiles is not None, "the case must have tiles"
    run = bm.coarsen(coarsen) if coarsen else bm
    q, k, v = make_qkv(batch, heads, T, S, d, dtype, seed=bs)
    if layout_time_first:  # read and written in place (outputs and gradients keep the layout)
        q, k, v = time_first(q, k, v)
    kpm = padding(batch, S)
    out, lse = ops.block_sparse_kernel("triton", q, k, v, _tables(run), run.block_size, run.causal, kpm, d**-0.5)
    if layout_time_first:
        assert out.stride() == q.stride(), f"out strides {out.stride()} != q's {q.stride()}"
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.block_sparse_attention(*ref, bm, key_padding_mask=kpm)
    check(out, lse, ref_out, ref_lse, (q, k, v), ref, dtype)


def out_only_case():
    """Only ``out`` is used: the lse gradient is None (no zero tensor, no dlse term)."""
    q, k, v = make_qkv(1, 2, 64, 64, 16, torch.float32, seed=5)
    w = LocalWindow.sliding(9, 0, causal=True)
    out, _ = ops.sliding_window_kernel("triton", q, k, v, None, w.group, w.left, w.right, w.causal, 0, 0.25)
    got = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = reference.sliding_window_attention(*ref, w)
    want = torch.autograd.grad(ref_out.pow(2).sum(), ref)
    for g, r in zip(got, want):
        assert rel(g, r) < 1e-5


def linear_case(T, m, d, dtype, decay, state, normalize, S=None):
    """``linear_attention`` through the Triton kernels against its float64 reference (out, final state, grads)."""
    S = T if S is None else S
    g = torch.Generator().manual_seed(T + m + d)
    q, k = (torch.rand(2, 2, n, m, generator=g).to(dtype) for n in (T, S))
    v = torch.randn(2, 2, S, d, generator=g).to(dtype)
    log_decay = -torch.rand(2, 2, S, generator=g) * 0.3 if decay else None
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[1, S - 3 :] = True
    init = None
    if state:
        init = (torch.rand(2, 2, m, d, generator=g), torch.rand(2, 2, m, generator=g) if normalize else None)
    results = []
    for backend, cast in (("triton", lambda x: x), ("reference", lambda x: x.double())):
        ins = [cast(x.detach()).requires_grad_() for x in (q, k, v)]
        out, (h, _) = linear_attention(
            *ins,
            causal=True,
            log_decay=None if log_decay is None else cast(log_decay),
            key_padding_mask=kpm,
            normalize=normalize,
            return_state=True,
            backend=backend,
            initial_state=None if init is None else (cast(init[0]), None if init[1] is None else cast(init[1])),
        )
        gen = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)).sum() + (h * h).sum()
        results.append([out, h, *torch.autograd.grad(loss, ins)])
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    for name, got, want in zip(("out", "state", "dq", "dk", "dv"), *results):
        assert rel(got, want) < tol, f"{name} {rel(got, want):.1e}"


def linear_segments_case(T, m, d, dtype, decay, normalize, S=None, block_d=None, through_state=True):
    """The segment-parallel schedule (forced: chunks of 32 and segments of 64 positions, 16 and 32 with ``block_d``
    value blocks, so ``T`` divides into neither) against the float64 reference: out,
    final ``H`` and ``z``, and the gradients of q, k, v and of the initial ``H`` and ``z`` (``through_state``:
    the loss also uses the final state)."""
    import importlib

    la = importlib.import_module("efficient_attention.kernels.linear_attention")  # the module, not the function
    S = T if S is None else S
    g = torch.Generator().manual_seed(T + m + d)
    q, k = (torch.rand(1, 2, n, m, generator=g).to(dtype) for n in (T, S))
    v = torch.randn(1, 2, S, d, generator=g).to(dtype)
    log_decay = -torch.rand(1, 2, S, generator=g) * 0.3 if decay else None
    kpm = torch.zeros(1, S, dtype=torch.bool)
    kpm[0, S - 3 :] = True
    init = (torch.rand(1, 2, m, d, generator=g), torch.rand(1, 2, m, generator=g))
    base = la._triton_config

    def forced(*args):
        cfg = dict(base(*args), BLOCK_C=32, SEG=64)
        if block_d is not None:
            cfg.update(BLOCK_D=block_d, BLOCK_C=16, SEG=32)
        return cfg

    results = []
    for backend, cast in (("triton", lambda x: x), ("reference", lambda x: x.double())):
        ins = [cast(x.detach()).requires_grad_() for x in (q, k, v)]
        st = [cast(x).requires_grad_() for x in init]
        la._triton_config = forced
        try:
            out, (h, z) = linear_attention(
                *ins,
                causal=True,
                log_decay=None if log_decay is None else cast(log_decay),
                key_padding_mask=kpm,
                normalize=normalize,
                return_state=True,
                backend=backend,
                initial_state=(st[0], st[1] if normalize else None),
            )
            gen = torch.Generator().manual_seed(1)
            loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)).sum()
            if through_state:
                loss = loss + (h * h).sum() + (z.sum() if normalize else 0)
            wrt = ins + (st if normalize else st[:1])
            grads = list(torch.autograd.grad(loss, wrt))  # the backward's kernels read the forced config too
        finally:
            la._triton_config = base
        results.append([out, h] + ([z] if normalize else []) + grads)
    names = ["out", "H", "z", "dq", "dk", "dv", "dH0", "dz0"] if normalize else ["out", "H", "dq", "dk", "dv", "dH0"]
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    for name, got, want in zip(names, *results):
        assert rel(got, want) < tol, f"{name} {rel(got, want):.1e}"


def is_time_first(x):
    return x.permute(2, 0, 1, 3).is_contiguous()


def linear_out_dtype_case(T, m, d, dtype, out_dtype, block_d=None, time_first_inputs=""):
    """The normalised result written by the kernels in ``out_dtype`` and the time-first ``(T, B, H, d)`` layout,
    the gradient read back in that dtype and layout; the loss uses the final normaliser ``z`` but not ``H`` (the
    backward then starts from a gradient of ``z`` alone); ``block_d`` forces value blocks (the normaliser's terms
    of the partial ``dq, dk`` in the first block only).  ``time_first_inputs`` ("qk", "v", "qkv"): those inputs
    are time-first head views, and their gradients must come back time-first (the others contiguous)."""
    import importlib

    la = importlib.import_module("efficient_attention.kernels.linear_attention")  # the module, not the function
    g = torch.Generator().manual_seed(T + m + d)
    q, k = (torch.rand(2, 3, T, m, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(2, 3, T, d, generator=g).to(dtype)
    if "qk" in time_first_inputs:
        q, k = (x.detach() for x in time_first(q, k))
    if "v" in time_first_inputs:
        (v,) = (x.detach() for x in time_first(v))
    log_decay = -torch.rand(2, 3, T, generator=g) * 0.3
    init = (torch.rand(2, 3, m, d, generator=g), torch.rand(2, 3, m, generator=g))
    base = la._triton_config
    results = []
    for backend, cast in (("triton", lambda x: x), ("reference", lambda x: x.double())):
        ins = [cast(x.detach()).requires_grad_() for x in (q, k, v)]
        st = [cast(x).requires_grad_() for x in init]
        if block_d is not None:
            la._triton_config = lambda *a: dict(base(*a), BLOCK_D=block_d, BLOCK_C=16, SEG=32)
        try:
            out, (_, z) = linear_attention(
                *ins,
                causal=True,
                log_decay=cast(log_decay),
                initial_state=(st[0], st[1]),
                return_state=True,
                backend=backend,
                out_dtype=out_dtype if backend == "triton" else None,
            )
            if backend == "triton":
                assert out.dtype == out_dtype, out.dtype
                assert out.permute(2, 0, 1, 3).is_contiguous(), f"not time-first: {out.stride()}"
            gen = torch.Generator().manual_seed(1)
            loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)).sum() + z.sum()
            grads = list(torch.autograd.grad(loss, ins + st))
        finally:
            la._triton_config = base
        if backend == "triton":  # each gradient in its input's layout: no permuting copy back to a projection
            for name, x, grad in zip("qkv", ins, grads):
                assert is_time_first(grad) == is_time_first(x), f"d{name} strides {grad.stride()}, {name} {x.stride()}"
                assert grad.is_contiguous() == x.is_contiguous(), f"d{name} strides {grad.stride()}"
        results.append([out, z] + grads)
    tol = 2e-5 if out_dtype == torch.float32 else 4e-3
    for name, got, want in zip(["out", "z", "dq", "dk", "dv", "dH0", "dz0"], *results):
        assert rel(got, want) < tol, f"{name} {rel(got, want):.1e}"


def linear_bwd_opcheck_case():
    """The registered backward op (what ``torch.compile`` traces) against its fake implementation, which must give
    each gradient the layout the kernels write it in: time-first heads time-first, the rest contiguous."""
    import importlib

    la = importlib.import_module("efficient_attention.kernels.linear_attention")  # the module, not the function
    bwd = torch.ops.efficient_attention.triton_linear_attention_bwd.default
    g = torch.Generator().manual_seed(3)
    q, k = time_first(*(torch.rand(2, 2, 40, 16, generator=g) for _ in range(2)))
    v = torch.randn(2, 2, 40, 24, generator=g)
    decay = -torch.rand(2, 2, 40, generator=g) * 0.3
    h0, z0 = torch.rand(2, 2, 16, 24, generator=g), torch.rand(2, 2, 16, generator=g)  # (every output written)
    for normalize in (True, False):
        o, den, _, _ = la.linear_fwd(q, k, v, decay, h0, z0, normalize, torch.float32, True)
        grad_o = torch.randn(o.shape, generator=g).permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
        args = (grad_o, None, None, q.detach(), k.detach(), v, decay, h0, z0, o, den, normalize)
        torch.library.opcheck(bwd, args)
        dq, dk, dv, _, _ = bwd(*args)
        assert is_time_first(dq) and is_time_first(dk) and dv.is_contiguous(), (dq.stride(), dv.stride())


def cosformer_fused_case(T, r, d, dtype, act, time_first=True, block_d=None):
    """cosFormer's features made inside the Triton kernels (``cos_sin``) from raw ``q, k`` (time-first head views
    with ``time_first``) against float64 linear attention on the features built outside: out, the final state
    (the kernels' interleaved feature order put back) and the raw rows' gradients; ``block_d`` forces value blocks
    and segments (partial ``dq, dk`` carried back to the raw rows, then summed)."""
    import importlib

    la = importlib.import_module("efficient_attention.kernels.linear_attention")  # the module, not the function
    g = torch.Generator().manual_seed(T + r + d)
    b, h = 2, 3
    if time_first:  # (T, B, H*r) projections viewed as heads
        q, k = (torch.randn(T, b, h * r, generator=g).view(T, b, h, r).permute(1, 2, 0, 3) for _ in range(2))
        v = torch.randn(T, b, h * d, generator=g).view(T, b, h, d).permute(1, 2, 0, 3)
    else:
        q, k = (torch.randn(b, h, T, r, generator=g) for _ in range(2))
        v = torch.randn(b, h, T, d, generator=g)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    theta = (torch.pi / 2) * torch.arange(T, dtype=torch.float64) / T
    cos_sin = torch.stack([theta.cos(), theta.sin()], -1)
    base = la._triton_config
    if block_d is not None:
        la._triton_config = lambda *a: dict(base(*a), BLOCK_D=block_d, BLOCK_C=16, SEG=32)
    try:
        ins = [x.detach().requires_grad_() for x in (q, k, v)]
        out, final, z = la.LinearTriton.run_fused(
            *ins, None, None, None, True, dtype, True, cos_sin.float().contiguous(), act
        )
        assert out.dtype == dtype and out.permute(2, 0, 1, 3).is_contiguous(), (out.dtype, out.stride())
        gen = torch.Generator().manual_seed(1)
        weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        loss = (out * weights.to(out.dtype)).sum()
        got = [out, final.view(b, h, r, 2, d).transpose(2, 3).reshape(b, h, 2 * r, d)]
        got += list(torch.autograd.grad(loss, ins))
    finally:
        la._triton_config = base
    for name, grad in zip("qkv", got[2:]):  # in the inputs' layouts (time-first heads: no copy back)
        assert is_time_first(grad) if time_first else grad.is_contiguous(), f"d{name} strides {grad.stride()}"
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]

    def feats(x):
        a = torch.relu(x) if act == 0 else 1.0 + torch.nn.functional.elu(x)
        return torch.cat([a * cos_sin[:, :1], a * cos_sin[:, 1:]], -1)

    want_out, (want_h, _) = linear_attention(
        feats(ref[0]), feats(ref[1]), ref[2], causal=True, return_state=True, backend="reference"
    )
    want = [want_out, want_h] + list(torch.autograd.grad((want_out * weights).sum(), ref))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, a, w in zip(("out", "state", "dq", "dk", "dv"), got, want):
        assert rel(a, w) < tol, f"{name} {rel(a, w):.1e}"


def cosformer_module_fused_case():
    """Causal cosFormer without padding on the Triton kernels (the features made inside them: the path is counted)
    against itself in float64: output and the gradients of the input and of the projections."""
    import importlib

    from efficient_attention import build_attention

    la = importlib.import_module("efficient_attention.kernels.linear_attention")
    cf = importlib.import_module("efficient_attention.attentions.cosformer")
    select, fused, calls = la.LINEAR_ATTENTION.select, cf._causal_triton, []

    def counted(*args):
        calls.append(1)
        return fused(*args)

    for act in ("relu", "elu"):
        torch.manual_seed(0)
        m = build_attention("cosformer", embed_dim=32, num_heads=2, causal=True, self_attention=True, act_fun=act)
        x = torch.randn(70, 2, 32, requires_grad=True)
        la.LINEAR_ATTENTION.select = lambda *a, **kw: la.LinearTriton
        cf._causal_triton = counted
        try:
            out = m(x, x, x, need_weights=False)[0]
            got = [out, *torch.autograd.grad(out.pow(2).sum(), [x, m.q_proj.weight, m.k_proj.weight])]
        finally:
            la.LINEAR_ATTENTION.select, cf._causal_triton = select, fused
        assert calls, "the fused Triton path was not taken"
        m = m.double()
        xd = x.detach().double().requires_grad_()
        ref = m(xd, xd, xd, need_weights=False)[0]
        want = [ref, *torch.autograd.grad(ref.pow(2).sum(), [xd, m.q_proj.weight, m.k_proj.weight])]
        for name, a, w in zip(("out", "dx", "dWq", "dWk"), got, want):
            assert rel(a, w) < 1e-5, f"{act} {name} {rel(a, w):.1e}"


def cosformer_features_case(dtype, out_dtype, act):
    """Noncausal cosFormer's features as one kernel (``kernels/_triton_cosformer.py``) from time-first head views
    against the ATen expression (the interpreter truncates a bf16 rounding, so no bf16 here); then the noncausal
    module through it (its four feature calls counted) against itself in float64."""
    import importlib

    from efficient_attention import build_attention

    cf = importlib.import_module("efficient_attention.attentions.cosformer")
    x = torch.randn(45, 2, 3, 24).to(dtype).permute(1, 2, 0, 3)
    table = cf._cos_sin(45, 50, x.device, torch.float32, out_dtype)[0]
    assert cf._triton_features_ok(x, table, out_dtype), "the kernel is not taken"
    got = cf._features(x, table, act, out_dtype)
    a = torch.relu(x) if act == "relu" else 1.0 + torch.nn.functional.elu(x.float())
    want = (a.unsqueeze(-2) * table).to(out_dtype).reshape(got.shape)
    assert rel(got, want) < 1e-6, f"features {rel(got, want):.1e}"
    tc = importlib.import_module("efficient_attention.kernels._triton_cosformer")
    real, calls = tc.cos_features, []
    tc.cos_features = lambda *args: calls.append(1) or real(*args)
    try:
        torch.manual_seed(0)
        m = build_attention("cosformer", embed_dim=32, num_heads=2, self_attention=True, act_fun=act)
        x = torch.randn(70, 2, 32, requires_grad=True)
        out = m(x, x, x, need_weights=False)[0]
        got = [out, *torch.autograd.grad(out.pow(2).sum(), [x, m.q_proj.weight])]
    finally:
        tc.cos_features = real
    assert len(calls) == 4, f"{len(calls)} feature kernel calls, not 4"
    m = m.double()
    xd = x.detach().double().requires_grad_()
    ref = m(xd, xd, xd, need_weights=False)[0]
    want = [ref, *torch.autograd.grad(ref.pow(2).sum(), [xd, m.q_proj.weight])]
    for name, a, w in zip(("out", "dx", "dWq"), got, want):
        assert rel(a, w) < 1e-5, f"{act} {name} {rel(a, w):.1e}"


def linear_modules_case():
    """Causal Performer, cosFormer, ABC with their linear attention on the Triton kernels (fp32) against
    themselves in float64 (PyTorch paths), with key padding; decoding after a prefill equals the full pass."""
    import importlib

    from efficient_attention import build_attention

    la = importlib.import_module("efficient_attention.kernels.linear_attention")  # the module, not the function

    select = la.LINEAR_ATTENTION.select
    for name, opts in (("performer", dict(approx_attn_dim=16)), ("cosformer", dict(max_len=128)), ("abc", {})):
        torch.manual_seed(0)
        m = build_attention(name, embed_dim=32, num_heads=2, causal=True, self_attention=True, **opts).eval()
        x = torch.randn(70, 2, 32)
        kpm = torch.zeros(2, 70, dtype=torch.bool)
        kpm[1, 60:] = True
        la.LINEAR_ATTENTION.select = lambda *a, **kw: la.LinearTriton  # also the decoding steps
        try:
            out = m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
            state = {}
            steps = [m(x[:50], x[:50], x[:50], incremental_state=state, need_weights=False)[0]]
            for t in range(50, 70):
                steps.append(
                    m(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state, need_weights=False)[0]
                )
        finally:
            la.LINEAR_ATTENTION.select = select
        ref = m.double()(x.double(), x.double(), x.double(), key_padding_mask=kpm, need_weights=False)[0]
        keep = (~kpm).t().unsqueeze(-1)
        assert rel(out * keep, ref * keep) < 1e-5, f"{name} full {rel(out * keep, ref * keep):.1e}"
        full = m.double()(x.double(), x.double(), x.double(), need_weights=False)[0]
        assert rel(torch.cat(steps), full) < 1e-5, f"{name} decoding {rel(torch.cat(steps), full):.1e}"


def abc_slots_case(dtype, scan, length=150, jump=70, segments=2, programs=None):
    """Causal ABC's slot weights and slot read on their Triton kernels (``kernels/_triton_abc.py``) against the
    ATen ops of the same autograd nodes, forward and backward: positions over several scan blocks (of 128) with a
    ragged tail, the scans split into ``segments`` (asserted; ``programs``: ``SCAN_PROGRAMS`` for the case), a
    jump of the running max by 120 inside a block at ``jump``, an empty slot and a dropout mask in the read;
    ``scan``: the normalisers from the scan (CUDA's path) or not (the CPU's)."""
    from efficient_attention.attentions import abc
    from efficient_attention.kernels import _triton_abc

    g = torch.Generator().manual_seed(7)
    bsz, heads, n, d = 2, 3, 16, 24
    programs_before = _triton_abc.SCAN_PROGRAMS
    if programs is not None:
        _triton_abc.SCAN_PROGRAMS = programs
    assert _triton_abc._segments(bsz * heads, length, 128)[0] == segments, _triton_abc._segments(6, length, 128)
    k = (torch.randn(bsz, heads, length, d, generator=g) * 0.5).to(dtype)
    k[0, 1, jump:] += 4.0  # with w below, scores jump by about 120 from position `jump`
    w = torch.randn(heads, n, d, generator=g)
    w[1] = w[1].abs() + 0.2
    num = torch.randn(bsz, heads, length, n, generator=g)
    nl = -torch.rand(bsz, heads, length, n, generator=g) * 3
    nl[0, 0, 5, 3] = 1000.0  # an empty slot
    mask = (torch.rand(bsz, heads, length, n, generator=g) > 0.1).float() / 0.9
    results = []
    for fused in (True, False):
        plain = abc._fused_slots
        abc._fused_slots = plain if fused else (lambda *a: False)
        try:
            kk, ww = k.clone().requires_grad_(), w.clone().requires_grad_()
            e, lnorm, _, decay = abc._SlotWeights.apply(kk, ww, scan)
            gen = torch.Generator().manual_seed(1)
            loss = (e.float() * torch.randn(e.shape, generator=gen)).sum()
            if scan:
                loss = loss + (lnorm * torch.randn(lnorm.shape, generator=gen)).sum()
            outs = [e, decay] + ([lnorm] if scan else []) + list(torch.autograd.grad(loss, (kk, ww)))
            for m in (None, mask):
                nn_, ll = num.clone().requires_grad_(), nl.clone().requires_grad_()
                r = abc._SlotRead.apply(nn_, ll, 0.125, m, dtype, True)
                gr = torch.randn(r.shape, generator=gen).to(r.dtype)
                outs += [r] + list(torch.autograd.grad((r * gr).sum(), (nn_, ll)))
        finally:
            abc._fused_slots, _triton_abc.SCAN_PROGRAMS = plain, programs_before
        results.append(outs)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for i, (got, want) in enumerate(zip(*results)):
        assert got.dtype == want.dtype and got.shape == want.shape, (i, got.dtype, want.dtype, got.shape)
        assert rel(got, want) < tol, f"output {i}: {rel(got, want):.1e}"


def abc_fused_module_case(dropout, in_place=False):
    """A causal ABC training step (unpadded: the fresh path) with its slot tensors on the Triton kernels equals the
    same module on the ATen ops (the same dropout masks: the same draws) and, without dropout, its float64 self on
    the general causal path (a key padding mask without padding), gradients included.  ``in_place``: q, k, v read
    as the heads of the time-first projections, as on CUDA (so the keys' gradient from the slot scores' linear
    attention is time-first, and the scores' part is added into it in place)."""
    from efficient_attention import build_attention
    from efficient_attention.attentions import abc

    scan, read = abc.ABC.SCAN_DEVICES, abc.ABC.IN_PLACE_DEVICES
    abc.ABC.SCAN_DEVICES = ("cpu", "cuda")
    abc.ABC.IN_PLACE_DEVICES = ("cpu", "cuda") if in_place else read
    try:
        results = []
        for fused in (True, False):
            plain = abc._fused_slots
            abc._fused_slots = plain if fused else (lambda *a: False)
            try:
                torch.manual_seed(0)
                m = build_attention("abc", embed_dim=32, num_heads=2, causal=True, self_attention=True, dropout=dropout)
                x = torch.randn(90, 2, 32, requires_grad=True)
                out = m.train()(x, x, x, need_weights=False)[0]
                # (not k_proj.bias: a key bias shifts every slot score of a slot alike and every slot's key alike,
                # so its gradient is exactly zero, rounding noise in both paths)
                params = [p for name, p in m.named_parameters() if name != "k_proj.bias"]
                grads = torch.autograd.grad(out.pow(2).sum(), [x, *params])
            finally:
                abc._fused_slots = plain
            results.append([out, *grads])
        for i, (got, want) in enumerate(zip(*results)):
            assert rel(got, want) < 1e-5, f"fused vs ATen, output {i}: {rel(got, want):.1e}"
        if not dropout:
            m64 = m.double()
            x64 = x.detach().double().requires_grad_()
            no_padding = torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool)  # the general causal path: reference
            out64 = m64(x64, x64, x64, key_padding_mask=no_padding, need_weights=False)[0]
            params64 = [p for name, p in m64.named_parameters() if name != "k_proj.bias"]
            grads64 = torch.autograd.grad(out64.pow(2).sum(), [x64, *params64])
            for i, (got, want) in enumerate(zip(results[0], [out64, *grads64])):
                assert rel(got, want) < 1e-4, f"fused vs float64, output {i}: {rel(got, want):.1e}"
    finally:
        abc.ABC.SCAN_DEVICES, abc.ABC.IN_PLACE_DEVICES = scan, read


def s4d_fused_case(
    activation, dtype, length, batch, d_state, padding=False, causal=True, bidirectional=None, segments=None
):
    """S4D on its Triton kernels (``kernels/_triton_s4d.py``, :class:`_FusedConvolution`) against its PyTorch forms
    (causal: the chunked scan; noncausal: the FFT convolution, with the second kernel over later positions unless
    ``bidirectional`` is False) and float64: the output and the gradients of the input and of every parameter, over
    ragged chunk tails, two column blocks (``batch`` > 16), padded modes (``d_state`` not a power of two), key
    padding, walks split into segments (small batches; ``segments``: the walk segments asserted, by setting
    ``WALK``'s segment columns to ``batch · segments``)."""
    from efficient_attention import build_attention
    from efficient_attention.attentions import s4d
    from efficient_attention.kernels import _triton_s4d

    results = []
    bounds, walk = s4d.FUSED_MAX_LENGTH, _triton_s4d.WALK
    if segments is not None:
        _triton_s4d.WALK = (*walk[:2], batch * segments)
        assert _triton_s4d._segments(batch, length)[0] == segments, _triton_s4d._segments(batch, length)
    for fused in (True, False):
        plain = s4d._fused_scan
        calls = []
        s4d._fused_scan = (lambda *a: calls.append(plain(*a)) or calls[-1]) if fused else (lambda *a: False)
        s4d.FUSED_MAX_LENGTH = {1: 1 << 30, 2: 1 << 30}  # the kernels at any length (the policy's bounds aside)
        try:
            torch.manual_seed(0)
            opts = dict(d_state=d_state, activation=activation, bidirectional=bidirectional)
            m = build_attention("s4d", embed_dim=16, num_heads=2, causal=causal, **opts)
            m.train()
            x = torch.randn(length, batch, 16, requires_grad=True)
            kpm = None
            if padding:
                kpm = torch.zeros(batch, length, dtype=torch.bool)
                kpm[0, length - 7 :] = True
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
            grads = torch.autograd.grad(out.float().pow(2).sum(), [x, *m.parameters()])
        finally:
            s4d._fused_scan, s4d.FUSED_MAX_LENGTH, _triton_s4d.WALK = plain, bounds, walk
        assert (bool(calls) and all(calls)) if fused else not calls, calls  # the fused path was taken, or not
        results.append([out, *grads])
    if dtype != torch.float32:
        for i, (got, want) in enumerate(zip(*results)):
            assert rel(got.float(), want.float()) < 2e-2, f"fused vs PyTorch, output {i}: {rel(got, want):.1e}"
        return
    # fp32: both against float64
    x64 = x.detach().double().requires_grad_()
    m64 = m.double()
    out64 = m64(x64, x64, x64, key_padding_mask=kpm, need_weights=False)[0]
    want = [out64, *torch.autograd.grad(out64.pow(2).sum(), [x64, *m64.parameters()])]
    for i, (got, plain, ref) in enumerate(zip(*results, want)):
        err, plain_err = rel(got, ref), rel(plain, ref)
        # (the kernels' fp32 sums land 2-4x further from float64 than the PyTorch forms', all within ~2e-5)
        assert err < max(4 * plain_err, 3e-5), f"output {i}: fused {err:.1e}, PyTorch {plain_err:.1e} from float64"


def fused_paths_fall_back_when_kernels_fail_case():
    """Kernels that cannot compile or run here (their probe raises) leave S4D and causal ABC on their PyTorch paths,
    with the same results: a fused path never turns a working model into an exception."""
    from efficient_attention import build_attention
    from efficient_attention.kernels import _triton_abc, _triton_s4d, backends

    def broken(*args):
        raise RuntimeError("compilation failed")

    real = (_triton_abc.probe_slots, _triton_s4d.probe_s4d)
    _triton_abc.probe_slots = _triton_s4d.probe_s4d = broken
    backends._probes.clear()
    try:
        for name in ("s4d", "abc"):
            torch.manual_seed(0)
            m = build_attention(name, embed_dim=16, num_heads=2, causal=True).train()
            x = torch.randn(40, 2, 16, requires_grad=True)
            out = m(x, x, x, need_weights=False)[0]
            (gx,) = torch.autograd.grad(out.sum(), x)
            x64 = x.detach().double().requires_grad_()
            ref = m.double()(x64, x64, x64, need_weights=False)[0]
            (g64,) = torch.autograd.grad(ref.sum(), x64)
            assert rel(out, ref) < 1e-5 and rel(gx, g64) < 1e-5, name
        assert backends._probes and all(v and "compilation failed" in v for v in backends._probes.values())
    finally:
        _triton_abc.probe_slots, _triton_s4d.probe_s4d = real
        backends._probes.clear()


def fused_paths_bounded_by_length_case():
    """The fused paths' length policy: S4D's causal kernels up to their bound, the PyTorch paths beyond it, S4D's
    bidirectional kernels not at all (``FUSED_MAX_LENGTH``); ABC's slot kernels at any length."""
    from efficient_attention.attentions import abc, s4d

    log_dt = {kernels: torch.zeros(kernels, 4) for kernels in (1, 2)}
    for length, fits in ((s4d.FUSED_MAX_LENGTH[1], True), (s4d.FUSED_MAX_LENGTH[1] + 1, False)):
        u = torch.empty(1, 4, length, 1)
        assert s4d._fused_scan(u, log_dt[1], 16, "gelu") is fits, ("s4d causal", length)
        assert s4d._fused_scan(u, log_dt[2], 16, "gelu") is False, ("s4d bidirectional", length)
    for length in (1, 1 << 17):
        assert abc._fused_slots(torch.empty(1, 1, length, 16), torch.float32) is True, ("abc", length)


def abc_step_case(dtype):
    """ABC's one-launch decoding step against its PyTorch form: head views of one projection, a prefill's strided
    state with an empty slot, a fresh state (running max -inf), a padded new key."""
    from efficient_attention.kernels.abc_step import abc_step, reference_abc_step

    torch.manual_seed(0)
    bsz, heads, n, d = 2, 3, 5, 24
    for fresh in (False, True):
        for kpm in (None, torch.tensor([[False], [True]])):
            y = torch.randn(bsz, 3 * heads, 1, d).to(dtype)
            q, k, v = y[:, :heads], y[:, heads : 2 * heads], y[:, 2 * heads :]
            w = torch.randn(heads, n, d)
            if fresh:
                z = torch.zeros(bsz, heads, n, d)
                state = (z, z, z[..., 0], torch.full((bsz, heads, 1), float("-inf")))
            else:
                norm = torch.rand(bsz, heads, 1, n).squeeze(-2) * 3
                norm[0, 0, 1] = 0.0  # an empty slot
                state = (
                    torch.randn(bsz, heads, d, n).transpose(-1, -2),
                    torch.randn(bsz, heads, n, d),
                    norm,
                    torch.randn(bsz, heads, 1),
                )
            got = abc_step(q, k, v, w, state, kpm, 0.3, backend="triton")
            want = reference_abc_step(q, k, v, w, state, kpm, 0.3, 0.0)
            assert got[0].dtype == dtype and got[1][0].dtype == torch.float32
            for g, r in zip((got[0], *got[1]), (want[0], *want[1])):
                g, r = g.float(), r.float()
                assert torch.equal(g == float("-inf"), r == float("-inf")), "running max"
                fin = torch.isfinite(r)
                err = rel(g[fin], r[fin])
                assert torch.isfinite(g[fin]).all() and err < (1e-2 if dtype != torch.float32 else 1e-5), (fresh, err)
    if dtype != torch.float32:
        return
    from efficient_attention import build_attention

    m = build_attention("abc", embed_dim=32, num_heads=2, causal=True, self_attention=True).eval()
    x = torch.randn(40, 2, 32)
    state: dict = {}
    with torch.no_grad():  # the kernel's case: generation
        steps = [m(x[:30], incremental_state=state, need_weights=False)[0]]
        steps += [m(x[t : t + 1], incremental_state=state, need_weights=False)[0] for t in range(30, 40)]
        full = m.double()(x.double(), need_weights=False)[0]
    assert rel(torch.cat(steps), full) < 1e-5, f"module decoding {rel(torch.cat(steps), full):.1e}"


def longshort_modules_case():
    """Noncausal and causal Long-Short on the Triton block-sparse kernel (one call over [memory slots ;
    sequence], fp32) against themselves in float64, with key padding; gradients of the inputs too."""
    from efficient_attention import build_attention

    select = ops.BLOCK_SPARSE.select
    for causal in (False, True):
        torch.manual_seed(0)
        m = build_attention(
            "longshort",
            embed_dim=32,
            num_heads=2,
            causal=causal,
            window_size=8,
            num_landmarks=6,
            chunk_size=5,
            chunk_rank=2,
        )
        x = torch.randn(150, 2, 32, requires_grad=True)
        kpm = torch.zeros(2, 150, dtype=torch.bool)
        kpm[1, 120:] = True
        ops.BLOCK_SPARSE.select = lambda *a, **kw: ops.BlockSparseTriton
        try:
            out = m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
            (grad,) = torch.autograd.grad(out[:120].sum(), x)
        finally:
            ops.BLOCK_SPARSE.select = select
        xd = x.detach().double().requires_grad_()
        ref = m.double()(xd, xd, xd, key_padding_mask=kpm, need_weights=False)[0]
        (ref_grad,) = torch.autograd.grad(ref[:120].sum(), xd)
        m.float()
        assert rel(out[:120], ref[:120]) < 1e-5, f"causal={causal} out {rel(out[:120], ref[:120]):.1e}"
        assert rel(grad, ref_grad) < 1e-5, f"causal={causal} grad {rel(grad, ref_grad):.1e}"


def landmark_case(bs, d, dtype, T, S, config=None, pad=True, views=False, **switches):
    """The landmark kernels (forward, dq, dk/dv) against the float64 PyTorch path, with key padding
    (a padded landmark among it) unless ``pad=False``; ``config`` forces the query tiles (64 or 128 rows
    per tile), ``switches`` the kernels' layout switches (``GATE_DOT``, ``KEYS_FIRST``, ``FUSED_DQ``); ``views`` passes
    q, k, v as the module does, head views ``(B, H, N, d)`` of time-first ``(N, B, H, d)`` tensors."""
    q, k, v = make_qkv(2, 2, T, S, d, dtype, seed=bs + T)
    if views:  # same values, strided like the module's heads (the kernels read them in place)
        q, k, v = (x.detach().permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_() for x in (q, k, v))
    kpm = None
    if pad:
        kpm = padding(2, S)
        kpm[1, 2 * bs - 1] = True
    base = landmark.landmark_config
    over = dict(switches, **({} if config is None else dict(BLOCK_M=config)))
    landmark.landmark_config = lambda *a: {
        key: {n: over.get(n, x) for n, x in val.items()} for key, val in base(*a).items()
    }
    try:
        out, lse = landmark.landmark_attention(q, k, v, bs, key_padding_mask=kpm, backend="triton")
        if views:
            assert out.stride() == q.stride(), "out should be allocated with q's strides"
        ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = landmark.landmark_attention(*ref, bs, key_padding_mask=kpm, backend="reference")
        check(out, lse, ref_out, ref_lse, (q, k, v), ref, dtype)
    finally:
        landmark.landmark_config = base


_CONFIGS = {name: getattr(triton_ops, name) for name in ("window_config", "block_config")}


def with_loads(tma: bool):
    """Force TMA descriptor loads (the interpreter emulates them) or pointer loads in every config."""
    for name, base in _CONFIGS.items():

        def cfg(*a, base=base):
            return {key: dict(val, TMA=tma) for key, val in base(*a).items()}

        setattr(triton_ops, name, cfg)
    triton_ops._tma_ok = lambda *ts, **kw: tma


def main() -> int:
    f32, f16 = torch.float32, torch.float16
    cases = []
    for tma in (True, False):
        cases += [
            (tma, "window sliding(17, 5) fp32", lambda: window_case(LocalWindow.sliding(17, 5), 16, f32)),
            (
                tma,
                "window causal q_offset fp32",
                lambda: window_case(LocalWindow.sliding(40, 0, causal=True), 16, f32, q_offset=5),
            ),
            (
                tma,
                "window blocks(16, 2, 0) causal fp32",
                lambda: window_case(LocalWindow.from_blocks(16, 2, 0, causal=True), 16, f32),
            ),
            (tma, "window thin tiles fp16 d32", lambda: window_case(LocalWindow.sliding(30, 0, causal=True), 32, f16)),
            (tma, "window 64x64 s2 tiles fp16 d128", lambda: window_case(LocalWindow.sliding(600, 0), 128, f16, S=100)),
            (
                tma,
                "window long tiles fp16 d128",
                lambda: window_case(LocalWindow.sliding(1100, 0, causal=True), 128, f16, S=140),
            ),
            (
                tma,
                "window wide-band tiles fp16 d64",
                lambda: window_case(LocalWindow.sliding(2047, 0, causal=True), 64, f16, S=140),
            ),
            (
                tma,
                "positions causal full band, mixed tiles, T % 64 != 0, d64 fp32",
                lambda: positions_case(LocalWindow.sliding(300, 0, causal=True), 64, f32, 150, 300, "spread"),
            ),
            (
                tma,
                "positions causal full band, repeated positions, padding (empty rows) fp32",
                lambda: positions_case(LocalWindow.sliding(200, 0, causal=True), 16, f32, 100, 200, "repeats", True),
            ),
            (
                tma,
                "positions ProbSparse order (fillers at 0), wide-band tiles fp16 d64",
                lambda: positions_case(LocalWindow.sliding(700, 0, causal=True), 64, f16, 150, 700, "fillers"),
            ),
            (
                tma,
                "positions early rows (unseen key blocks), thin tiles fp16 d32",
                lambda: positions_case(LocalWindow.sliding(260, 0, causal=True), 32, f16, 70, 260, "early"),
            ),
            (
                tma,
                "positions causal full band, positions on tile edges fp32",
                lambda: positions_case(LocalWindow.sliding(300, 0, causal=True), 16, f32, 150, 300, "edges"),
            ),
            (
                tma,
                "positions causal sliding(32) band, positions on tile edges fp32",
                lambda: positions_case(LocalWindow.sliding(32, 0, causal=True), 16, f32, 150, 300, "edges"),
            ),
            (
                tma,
                "positions causal sliding(100) band (full key tiles for some rows only) fp32",
                lambda: positions_case(LocalWindow.sliding(100, 0, causal=True), 16, f32, 150, 300, "spread"),
            ),
            (
                tma,
                "positions sliding(17, 5) band fp32",
                lambda: positions_case(LocalWindow.sliding(17, 5), 16, f32, 90, 200, "spread", True),
            ),
            (
                tma,
                "positions blocks(16, 2, 0) causal band, repeats fp32",
                lambda: positions_case(LocalWindow.from_blocks(16, 2, 0, causal=True), 16, f32, 90, 200, "repeats"),
            ),
            (tma, "layout bs16 per-head causal fp32", lambda: layout_case(16, 3, True, f32)),
            (tma, "layout bs128 shared fp32", lambda: layout_case(128, 1, False, f32)),
            (tma, "layout bs128 per-head causal fp16", lambda: layout_case(128, 3, True, f16)),
            (tma, "mask strided bs16 causal tiles fp32", lambda: mask_case("strided", 16, True, f32, local_attn_ctx=5)),
            (
                tma,
                "mask dilated bs64 per-head tiles fp16",
                lambda: mask_case("dilated", 64, False, f16, window=48, dilation=3),
            ),
            (tma, "mask sliding bs128 causal fp32", lambda: mask_case("sliding", 128, True, f32, window=70)),
            (
                tma,
                "mask fixed bs16 -> 64 coarsened fp16",
                lambda: mask_case("local", 16, True, f16, coarsen=64, local_attn_ctx=16),
            ),
            (
                tma,
                "mask strided bs64 causal time-first B2 fp32",
                lambda: mask_case("strided", 64, True, f32, batch=2, layout_time_first=True, local_attn_ctx=37),
            ),
        ]
    cases.append((False, "out-only gradient", out_only_case))
    cases.append(
        (False, "probsparse causal on the positions kernel = its SDPA path d32 fp32", lambda: probsparse_case(32))
    )
    cases.append(
        (False, "probsparse causal on the positions kernel = its SDPA path d64 fp32", lambda: probsparse_case(64))
    )
    cases.append((False, "longshort modules on the block-sparse kernel", longshort_modules_case))
    cases += [
        (False, "linear decay+state+padding fp32 m16 d5", lambda: linear_case(70, 16, 5, f32, True, True, True)),
        (False, "linear fp16 m20 d40 T<S", lambda: linear_case(40, 20, 40, f16, False, False, True, S=75)),
        (False, "linear unnormalised m1 state fp32", lambda: linear_case(33, 1, 16, f32, True, True, False)),
        (
            False,
            "linear d64 normalised: 2 value blocks, partial dq/dk summed fp32",
            lambda: linear_case(40, 16, 64, f32, True, True, True),
        ),
        (
            False,
            "linear 3 segments, d64, in-kernel normaliser, decay, states fp32",
            lambda: linear_segments_case(150, 16, 64, f32, True, True),
        ),
        (
            False,
            "linear 2 segments, d40, in-kernel normaliser, T<S, gradient through out only fp16",
            lambda: linear_segments_case(70, 20, 40, f16, False, True, S=90, through_state=False),
        ),
        (
            False,
            "linear 3 segments x 2 value blocks, partial dq/dk, unnormalised fp32",
            lambda: linear_segments_case(70, 16, 64, f32, True, False, block_d=32),
        ),
        (
            False,
            "linear 3 segments x 2 value blocks, in-kernel normaliser, states fp32",
            lambda: linear_segments_case(70, 16, 64, f32, True, True, block_d=32),
        ),
        (False, "linear fp16 out time-first, gradient via z only", lambda: linear_out_dtype_case(50, 16, 24, f16, f16)),
        (
            False,
            "linear fp32 out time-first, 2 value blocks x 2 segments",
            lambda: linear_out_dtype_case(60, 24, 40, f32, f32, block_d=16),
        ),
        (
            False,
            "linear fp32 time-first q, k: their gradients time-first, dv contiguous",
            lambda: linear_out_dtype_case(40, 16, 24, f32, f32, time_first_inputs="qk"),
        ),
        (
            False,
            "linear fp16 time-first v, 2 value blocks: dv time-first, partial dq, dk contiguous",
            lambda: linear_out_dtype_case(50, 16, 40, f16, f16, block_d=16, time_first_inputs="v"),
        ),
        (
            False,
            "linear fp32 time-first q, k, v, 2 value blocks x 2 segments: every gradient time-first",
            lambda: linear_out_dtype_case(60, 24, 40, f32, f32, block_d=16, time_first_inputs="qkv"),
        ),
        (False, "linear backward op: opcheck of its fake, gradients in the inputs' layouts", linear_bwd_opcheck_case),
        (False, "cosformer fused features relu fp32 time-first", lambda: cosformer_fused_case(70, 16, 24, f32, 0)),
        (
            False,
            "cosformer fused features 1+elu fp32 r5 contiguous",
            lambda: cosformer_fused_case(45, 5, 16, f32, 1, time_first=False),
        ),
        (
            False,
            "cosformer fused features relu fp16 2 value blocks x segments",
            lambda: cosformer_fused_case(90, 12, 40, f16, 0, block_d=16),
        ),
        (
            False,
            "cosformer fused features 1+elu fp32 2 value blocks x segments time-first",
            lambda: cosformer_fused_case(70, 8, 32, f32, 1, block_d=16),
        ),
        (False, "cosformer module fused features fp32", cosformer_module_fused_case),
        (False, "linear modules performer/cosformer/abc fp32", linear_modules_case),
        (False, "cosformer noncausal features kernel relu fp32", lambda: cosformer_features_case(f32, f32, "relu")),
        (False, "cosformer noncausal features kernel 1+elu fp16", lambda: cosformer_features_case(f16, f32, "elu")),
        (False, "abc fused slot weights and read, scanned normalisers fp32", lambda: abc_slots_case(f32, True)),
        (False, "abc fused slot weights and read, no scan bf16", lambda: abc_slots_case(torch.bfloat16, False)),
        (
            False,
            "abc fused slots fp32, 4 scan segments, the jump in the third",
            lambda: abc_slots_case(f32, True, length=420, jump=300, segments=4),
        ),
        (
            False,
            "abc fused slots fp32, 2 segments of 2 blocks, no scan",
            lambda: abc_slots_case(f32, False, length=420, jump=300, segments=2, programs=12),
        ),
        (
            False,
            "abc fused slots fp32, one walk per (batch, head)",
            lambda: abc_slots_case(f32, True, length=420, jump=300, segments=1, programs=0),
        ),
        (False, "abc fused slots in a causal training step", lambda: abc_fused_module_case(0.0)),
        (False, "abc fused slots in a causal training step with dropout", lambda: abc_fused_module_case(0.2)),
        (
            False,
            "abc fused slots in a causal training step, q k v read in place",
            lambda: abc_fused_module_case(0.0, in_place=True),
        ),
        (False, "s4d fused causal scan gelu fp32, 2 chunks", lambda: s4d_fused_case("gelu", f32, 150, 3, 16)),
        (
            False,
            "s4d fused causal scan identity fp32, 2 batch blocks, 20 modes, padding",
            lambda: s4d_fused_case("identity", f32, 90, 18, 20, padding=True),
        ),
        (False, "s4d fused causal scan tanh bf16", lambda: s4d_fused_case("tanh", torch.bfloat16, 130, 2, 16)),
        (False, "s4d fused causal scan silu fp32 short", lambda: s4d_fused_case("silu", f32, 20, 2, 8)),
        (False, "s4d fused causal scan relu fp16", lambda: s4d_fused_case("relu", f16, 70, 2, 16)),
        (
            False,
            "s4d fused bidirectional gelu fp32 = FFT, padding",
            lambda: s4d_fused_case("gelu", f32, 150, 3, 16, padding=True, causal=False),
        ),
        (
            False,
            "s4d fused bidirectional identity fp32, 2 batch blocks, 12 modes",
            lambda: s4d_fused_case("identity", f32, 70, 17, 12, causal=False),
        ),
        (
            False,
            "s4d fused noncausal one kernel silu bf16",
            lambda: s4d_fused_case("silu", torch.bfloat16, 100, 2, 16, causal=False, bidirectional=False),
        ),
        (
            False,
            "s4d fused causal gelu fp32, 2 walk segments of 3 chunks (the last ragged), padding",
            lambda: s4d_fused_case("gelu", f32, 300, 1, 16, padding=True, segments=2),
        ),
        (
            False,
            "s4d fused causal silu fp32, 4 segments x 6 rows over 2 column blocks",
            lambda: s4d_fused_case("silu", f32, 400, 6, 12, segments=4),
        ),
        (
            False,
            "s4d fused bidirectional identity fp32, 2 walk segments of 3 chunks",
            lambda: s4d_fused_case("identity", f32, 330, 2, 16, causal=False, segments=2),
        ),
        (
            False,
            "s4d fused bidirectional gelu bf16, 4 walk segments",
            lambda: s4d_fused_case("gelu", torch.bfloat16, 500, 2, 16, causal=False, segments=4),
        ),
        (
            False,
            "s4d and abc on their PyTorch paths when their kernels fail",
            fused_paths_fall_back_when_kernels_fail_case,
        ),
        (
            False,
            "s4d beyond its length bound on its PyTorch path, abc at any length",
            fused_paths_bounded_by_length_case,
        ),
        (False, "abc decoding step fp32", lambda: abc_step_case(f32)),
        (False, "abc decoding step fp16", lambda: abc_step_case(f16)),
        (False, "landmark bs16 fp32 64-row tiles", lambda: landmark_case(16, 16, f32, 70, 70, config=64)),
        (
            False,
            "landmark bs16 fp16 128-row tiles, last T of S",
            lambda: landmark_case(16, 16, f16, 50, 150, config=128),
        ),
        (False, "landmark bs32 fp32 one decoding step", lambda: landmark_case(32, 16, f32, 1, 77)),
        (False, "landmark bs64 fp16 d32", lambda: landmark_case(64, 32, f16, 150, 150)),
        (
            False,
            "landmark bs16 fp32 head views, no padding, gate dots",
            lambda: landmark_case(16, 16, f32, 70, 70, pad=False, views=True, GATE_DOT=True),
        ),
        (
            False,
            "landmark bs32 fp16 keys-first dk/dv tiles, last T of S",
            lambda: landmark_case(32, 16, f16, 40, 100, KEYS_FIRST=True, FUSED_DQ=False),
        ),
        (False, "landmark bs16 fp16 gate dots, padding", lambda: landmark_case(16, 32, f16, 50, 50, GATE_DOT=True)),
        (
            False,
            "landmark bs32 fp32 dq added by the dk/dv kernel (atomics), head views, last T of S",
            lambda: landmark_case(32, 16, f32, 40, 100, views=True, FUSED_DQ=True),
        ),
    ]
    only = sys.argv[1:]  # names to run (substrings; none: every case)
    cases = [c for c in cases if not only or any(o in c[1] for o in only)]
    failed = []
    for tma, name, run in cases:
        with_loads(tma)
        label = f"{name} [{'tma' if tma else 'pointers'}]"
        try:
            run()
            print("ok  ", label, flush=True)
        except Exception:  # report every failing case, not only the first
            failed.append(label)
            print("FAIL", label, flush=True)
            traceback.print_exc()
    if failed:
        print(f"{len(failed)} of {len(cases)} cases failed: {failed}")
        return 1
    print(f"all {len(cases)} cases passed")
    return 0


if __name__ == "__main__":
    if os.environ.get("EA_SM90_RECORD"):  # the launches, for ``sm90_compile.py`` to build for the GPU
        from sm90_compile import recording

        with recording(os.environ["EA_SM90_RECORD"]):
            code = main()
        sys.exit(code)
    sys.exit(main())
