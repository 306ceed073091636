"""The Triton kernels run by Triton's interpreter on the CPU, against the float64 reference.

Run by ``tests/test_kernels_triton_interpreter.py`` in a subprocess (``TRITON_INTERPRET=1`` must be
set before the kernels are defined, and must not leak into GPU tests of the same session).  Covers
what the GPU tests cover where CI has no GPU: every tile config that ``triton_ops`` can pick (thin,
64x64, long tiles; layout blocks of 16 and 128), TMA descriptor loads and pointer loads, windows with
groups / q_offset / key padding, per-head and shared layouts, gradients through ``out`` and ``lse``,
and a gradient through ``out`` alone.  Exits non-zero with the failing cases listed.
"""
from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from efficient_attention.kernels import landmark, reference, triton_ops  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402
from kernel_cases import loss_and_grads, make_qkv, padding, random_layout  # noqa: E402

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
    out, lse = triton_ops.sliding_window_eager(q, k2, v2, kpm, window.group, window.left, window.right,
                                               window.causal, q_offset, d ** -0.5)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.sliding_window_attention(*ref, window, q_offset=q_offset, key_padding_mask=kpm)
    check(out, lse, ref_out, ref_lse, (q, k, v), ref, dtype)


def layout_case(bs, layout_heads, causal, dtype, d=16):
    T = S = 2 * bs + bs // 2 + 3
    n = -(-T // bs)
    q, k, v = make_qkv(1, 3, T, S, d, dtype, seed=bs)
    layout = random_layout(layout_heads, n, n, density=0.5, seed=bs + layout_heads)
    kpm = padding(1, S)
    out, lse = triton_ops.block_sparse_eager(q, k, v, layout, bs, causal, kpm, d ** -0.5)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.block_sparse_attention(*ref, layout, bs, causal=causal, key_padding_mask=kpm)
    check(out, lse, ref_out, ref_lse, (q, k, v), ref, dtype)


def out_only_case():
    """Only ``out`` is used: the lse gradient is None (no zero tensor, no dlse term)."""
    q, k, v = make_qkv(1, 2, 64, 64, 16, torch.float32, seed=5)
    w = LocalWindow.sliding(9, 0, causal=True)
    out, _ = triton_ops.sliding_window_eager(q, k, v, None, w.group, w.left, w.right, w.causal, 0, 0.25)
    got = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = reference.sliding_window_attention(*ref, w)
    want = torch.autograd.grad(ref_out.pow(2).sum(), ref)
    for g, r in zip(got, want):
        assert rel(g, r) < 1e-5


def landmark_case(bs, d, dtype, T, S, config=None):
    """The landmark kernels (forward, dq, dk/dv) against the float64 PyTorch path, with key padding
    (a padded landmark among it); ``config`` forces the query tiles (64 or 128 rows per tile)."""
    q, k, v = make_qkv(2, 2, T, S, d, dtype, seed=bs + T)
    kpm = padding(2, S)
    kpm[1, 2 * bs - 1] = True
    base = landmark.landmark_config
    if config is not None:
        landmark.landmark_config = lambda *a: {key: dict(val, BLOCK_M=config) for key, val in base(*a).items()}
    try:
        out, lse = landmark.landmark_attention(q, k, v, bs, key_padding_mask=kpm, backend="triton")
        ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = landmark.landmark_attention(*ref, bs, key_padding_mask=kpm, backend="torch")
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
    triton_ops._tma_ok = lambda *ts: tma


def main() -> int:
    f32, f16 = torch.float32, torch.float16
    cases = []
    for tma in (True, False):
        cases += [
            (tma, "window sliding(17, 5) fp32", lambda: window_case(LocalWindow.sliding(17, 5), 16, f32)),
            (tma, "window causal q_offset fp32", lambda: window_case(LocalWindow.sliding(40, 0, causal=True), 16, f32,
                                                                    q_offset=5)),
            (tma, "window blocks(16, 2, 0) causal fp32", lambda: window_case(LocalWindow.from_blocks(16, 2, 0, causal=True),
                                                                             16, f32)),
            (tma, "window thin tiles fp16 d32", lambda: window_case(LocalWindow.sliding(30, 0, causal=True), 32, f16)),
            (tma, "window 64x64 s2 tiles fp16 d128", lambda: window_case(LocalWindow.sliding(600, 0), 128, f16, S=100)),
            (tma, "window long tiles fp16 d128", lambda: window_case(LocalWindow.sliding(1100, 0, causal=True), 128, f16,
                                                                     S=140)),
            (tma, "layout bs16 per-head causal fp32", lambda: layout_case(16, 3, True, f32)),
            (tma, "layout bs128 shared fp32", lambda: layout_case(128, 1, False, f32)),
            (tma, "layout bs128 per-head causal fp16", lambda: layout_case(128, 3, True, f16)),
        ]
    cases.append((False, "out-only gradient", out_only_case))
    cases += [
        (False, "landmark bs16 fp32 64-row tiles", lambda: landmark_case(16, 16, f32, 70, 70, config=64)),
        (False, "landmark bs16 fp16 128-row tiles, last T of S", lambda: landmark_case(16, 16, f16, 50, 150, config=128)),
        (False, "landmark bs32 fp32 one decoding step", lambda: landmark_case(32, 16, f32, 1, 77)),
        (False, "landmark bs64 fp16 d32", lambda: landmark_case(64, 32, f16, 150, 150)),
    ]
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
    sys.exit(main())
