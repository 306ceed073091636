"""The chunked linear-attention op: reference vs the C++ kernels vs the PyTorch chunked path vs a step-by-step
recurrence.

The Triton backend is checked by ``triton_interpreter_cases.py`` (CPU, Triton's interpreter) and
``test_kernels_gpu.py`` (GPU).
"""

import pytest
import torch

from efficient_attention.kernels import choose_backend, not_supported_reasons
from efficient_attention.kernels._loader import cpu_extension, cpu_extension_reason
from efficient_attention.kernels.linear_attention import linear_attention

# (where the kernels should be built, test_kernels_cpu.py fails when they are not; here only their cases skip)
_NO_CPP = None if cpu_extension() is not None else cpu_extension_reason()
NEEDS_CPP = pytest.mark.skipif(_NO_CPP is not None, reason=f"C++ kernels not built: {_NO_CPP}")
CPP = pytest.param("cpp", marks=NEEDS_CPP)
CPU_BACKENDS = [CPP, "chunked", "reference"]

DTYPES = [torch.float64, torch.float32]
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def make(B=2, H=3, T=37, S=None, m=8, d=5, dtype=torch.float64, seed=0):
    S = T if S is None else S
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, T, m, generator=g, dtype=torch.float64).to(dtype)
    k = torch.rand(B, H, S, m, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, S, d, generator=g, dtype=torch.float64).to(dtype)
    decay = -torch.rand(B, H, S, generator=g, dtype=torch.float64)
    state = (
        torch.rand(B, H, m, d, generator=g, dtype=torch.float64),
        torch.rand(B, H, m, generator=g, dtype=torch.float64),
    )
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[-1, S - 4 :] = True
    return q, k, v, decay, state, kpm


def recurrence(q, k, v, decay, state, kpm, normalize=True):
    """Position by position, the definition: H_t = e^{g_t} H_{t-1} + k_t v_tᵀ, out_t = q_t H_t / q_t z_t."""
    q, k, v = q.double(), k.double(), v.double()
    k = k.masked_fill(kpm[:, None, :, None], 0.0) if kpm is not None else k
    B, H, S, m = k.shape
    h = torch.zeros(B, H, m, v.shape[-1], dtype=torch.float64) if state is None else state[0].clone()
    z = torch.zeros(B, H, m, dtype=torch.float64) if state is None else state[1].clone()
    offset = S - q.shape[2]
    outs = []
    for t in range(S):
        e = torch.ones(B, H, 1, dtype=torch.float64) if decay is None else decay[..., t : t + 1].exp()
        h = e.unsqueeze(-1) * h + k[..., t, :, None] * v[..., t, None, :]
        z = e * z + k[..., t, :]
        if t >= offset:
            num = (q[..., t - offset, None, :] @ h).squeeze(-2)
            den = (q[..., t - offset, :] * z).sum(-1, keepdim=True)
            outs.append(num / den if normalize else num)
    return torch.stack(outs, dim=-2), (h, z)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_matches_the_recurrence(backend, with_state, with_decay, chunk, dtype):
    q, k, v, decay, state, kpm = make(dtype=dtype)
    decay = decay if with_decay else None
    state = state if with_state else None
    out, (h, z) = linear_attention(
        q,
        k,
        v,
        causal=True,
        log_decay=decay,
        key_padding_mask=kpm,
        initial_state=state,
        return_state=True,
        chunk_size=chunk,
        backend=backend,
    )
    want, (wh, wz) = recurrence(q, k, v, decay, state, kpm)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    torch.testing.assert_close(h.double(), wh, **TOL[dtype])
    torch.testing.assert_close(z.double(), wz, **TOL[dtype])


@pytest.mark.parametrize("T,S", [(37, 37), (9, 37), (1, 20)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fewer_queries_than_keys_are_the_last_positions(T, S, backend):
    q, k, v, decay, state, kpm = make(T=T, S=S)
    out = linear_attention(
        q, k, v, causal=True, log_decay=decay, key_padding_mask=kpm, initial_state=state, chunk_size=8, backend=backend
    )
    torch.testing.assert_close(out, recurrence(q, k, v, decay, state, kpm)[0], **TOL[torch.float64])


def test_unnormalized_and_no_state_normaliser():
    q, k, v, decay, state, kpm = make()
    out, (h, z) = linear_attention(
        q,
        k,
        v,
        causal=True,
        log_decay=decay,
        normalize=False,
        return_state=True,
        initial_state=(state[0], None),
        chunk_size=7,
    )
    want, (wh, _) = recurrence(q, k, v, decay, state, None, normalize=False)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    torch.testing.assert_close(h, wh, **TOL[torch.float64])
    assert z is None


def test_noncausal_sees_every_unpadded_key_and_the_state():
    q, k, v, _, state, kpm = make(T=11, S=23)
    out, (h, z) = linear_attention(q, k, v, causal=False, key_padding_mask=kpm, initial_state=state, return_state=True)
    kk = k.masked_fill(kpm[:, None, :, None], 0.0)
    hh, zz = state[0] + kk.transpose(-1, -2) @ v, state[1] + kk.sum(-2)
    torch.testing.assert_close(out, (q @ hh) / (q @ zz.unsqueeze(-1)), **TOL[torch.float64])
    torch.testing.assert_close(h, hh)
    torch.testing.assert_close(z, zz)


def test_prefill_state_continues_exactly():
    """A prefill's final state handed to the next call equals one call over the whole sequence."""
    q, k, v, decay, _, _ = make(T=50)
    full = linear_attention(q, k, v, causal=True, log_decay=decay, chunk_size=8)
    first, state = linear_attention(
        q[:, :, :30],
        k[:, :, :30],
        v[:, :, :30],
        causal=True,
        log_decay=decay[..., :30],
        return_state=True,
        chunk_size=8,
    )
    second = linear_attention(
        q[:, :, 30:],
        k[:, :, 30:],
        v[:, :, 30:],
        causal=True,
        log_decay=decay[..., 30:],
        initial_state=state,
        chunk_size=8,
    )
    torch.testing.assert_close(torch.cat([first, second], dim=-2), full, **TOL[torch.float64])


def test_rows_with_nothing_attended_are_zero_with_finite_gradients():
    q, k, v, _, _, _ = make(T=6)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, :3] = True  # left padding: query rows 0-2 of batch 0 see nothing
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = linear_attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert out[0, :, :3].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize(
    "causal,backend", [pytest.param(True, "cpp", marks=NEEDS_CPP), (True, "chunked"), (False, None)]
)
def test_gradcheck_float64(causal, backend):
    q, k, v, decay, state, kpm = make(B=1, H=2, T=9, m=3, d=2)
    h0, z0 = (x.requires_grad_() for x in state)
    ins = [x.requires_grad_() for x in (q, k, v)]

    def fn(q, k, v, h0, z0):
        out, (h, z) = linear_attention(
            q,
            k,
            v,
            causal=causal,
            log_decay=decay if causal else None,
            key_padding_mask=kpm,
            initial_state=(h0, z0),
            return_state=True,
            chunk_size=4,
            backend=backend,
        )
        return out, h, z

    assert torch.autograd.gradcheck(fn, (*ins, h0, z0))


@pytest.mark.parametrize("backend", [CPP, "chunked"])
def test_gradients_agree_with_the_reference(backend):
    q, k, v, decay, state, kpm = make(T=45)
    grads = []
    for name in (backend, "reference"):
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        out, (h, z) = linear_attention(
            *ins,
            causal=True,
            log_decay=decay,
            key_padding_mask=kpm,
            initial_state=state,
            return_state=True,
            chunk_size=16,
            backend=name,
        )
        (out.sin().sum() + h.sum() + z.sum()).backward()
        grads.append([x.grad for x in ins])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_accumulate_in_fp32(dtype):
    q, k, v, decay, state, kpm = make(T=70, dtype=dtype)
    out = linear_attention(q, k, v, causal=True, log_decay=decay.float(), key_padding_mask=kpm)
    assert out.dtype == torch.float32
    want = recurrence(q, k, v, decay, None, kpm)[0]
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def test_empty_sequences():
    q, k, v, _, state, _ = make(T=0)
    out, (h, z) = linear_attention(q, k, v, causal=True, initial_state=state, return_state=True)
    assert out.shape == (2, 3, 0, 5)
    torch.testing.assert_close(h, state[0])
    torch.testing.assert_close(z, state[1])


def test_dispatch_on_cpu_is_the_cpp_kernel_with_reasons_for_triton(monkeypatch):
    q, k, v, *_ = make(dtype=torch.float32)  # 6 (batch, head) pairs: enough for the 2 threads set here
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert choose_backend("linear_attention", q, k, v) == ("chunked" if _NO_CPP else "cpp")
    reasons = not_supported_reasons("linear_attention", q, k, v)
    assert reasons["chunked"] == [] and (reasons["cpp"] == []) == (_NO_CPP is None)
    assert any("not CUDA" in r for r in reasons["triton"])
    wide = torch.zeros(1, 1, 1, 300)
    assert any("features" in r for r in not_supported_reasons("linear_attention", wide, wide, wide)["triton"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(2, 3, 4)), "4-D"),
        (dict(q=torch.zeros(2, 3, 4, 7)), "q"),
        (dict(v=torch.zeros(2, 3, 5, 5)), "v"),
        (dict(log_decay=torch.zeros(2, 3, 4), causal=False), "causal"),
        (dict(log_decay=torch.zeros(2, 3, 5)), "log_decay"),
        (dict(log_decay=torch.zeros(2, 3, 4, requires_grad=True)), "detached"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), "key_padding_mask"),
        (dict(initial_state=(torch.zeros(2, 3, 8, 5), None)), "normaliser"),
        (dict(initial_state=(torch.zeros(2, 3, 8, 4), torch.zeros(2, 3, 8))), "initial_state"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(backend="cuda"), "backend"),
        (dict(q=torch.zeros(2, 3, 6, 8)), "T <= S"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(q=torch.zeros(2, 3, 4, 8), k=torch.zeros(2, 3, 4, 8), v=torch.zeros(2, 3, 4, 5), causal=True)
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    "m,d,bh,seq",
    [
        (16, 64, 32, 32768),  # Performer in CAB's setting (the normaliser is a vector beside the state)
        (128, 64, 32, 8192),  # cosFormer
        (64, 16, 32, 32768),  # ABC's slot scores
        (256, 128, 32, 8192),  # the widest: value blocks
        (128, 128, 4, 4096),
        (16, 64, 32, 100),  # too short to cut
        (16, 1, 1, 16),
    ],
)
def test_triton_config_tiles_and_segments(m, d, bh, seq):
    """The Triton schedule (pure Python, checked here; the kernels run in the interpreter cases): whole tiles,
    segments that are whole chunks, none empty, at most about two programs per SM, one value block (no partial
    dq/dk buffers) for every mechanism's shape."""
    from efficient_attention.kernels.linear_attention import (
        MIN_SEGMENT_CHUNKS,
        TILE_LIMIT,
        _checked_config,
        _triton_config,
    )

    sms = 132
    cfg = _checked_config(_triton_config(m, d, torch.bfloat16, bh, sms, seq), m, d)
    assert cfg["BLOCK_M"] >= m and cfg["BLOCK_M"] * cfg["BLOCK_D"] <= TILE_LIMIT
    n_d = -(-d // cfg["BLOCK_D"])
    if m <= 128 and d <= 128:
        assert n_d == 1
    assert cfg["SEG"] % cfg["BLOCK_C"] == 0
    nseg = -(-seq // cfg["SEG"])
    assert (nseg - 1) * cfg["SEG"] < seq  # no empty segment
    if nseg > 1:
        assert bh * n_d * nseg <= 2 * sms and cfg["SEG"] // cfg["BLOCK_C"] >= MIN_SEGMENT_CHUNKS
    if seq >= 8192 and bh * n_d <= sms:
        assert nseg > 1  # long sequences on few heads run in parallel over the length
    if d == 64 and m <= 128:  # 64 values: one 64-wide block (no 16-wide tail tile beside it any more)
        assert cfg["BLOCK_D"] == 64


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(BLOCK_D=48), "BLOCK_D"),
        (dict(BLOCK_C=8), "BLOCK_C"),
        (dict(SEG=48), "SEG"),
        (dict(BLOCK_M=8), "BLOCK_M"),
        (dict(TAIL=True), "unknown"),  # the former tail tile is no option any more
    ],
)
def test_triton_config_out_of_bounds_is_refused(change, match):
    from efficient_attention.kernels.linear_attention import _checked_config, _triton_config

    cfg = dict(_triton_config(16, 64, torch.bfloat16, 32, 132, 32768), **change)
    with pytest.raises(ValueError, match=match):
        _checked_config(cfg, 16, 64)


@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("backend", [CPP, "chunked"])
def test_gradcheck_float64_normaliser_without_state_and_fewer_queries(with_decay, backend):
    """The C++ and chunked paths' normaliser beside the state (no ones column): T < S, no initial state, the final
    ``z`` in the loss, chunks that do not divide the length."""
    q, k, v, decay, _, kpm = make(B=1, H=2, T=5, S=11, m=3, d=2)
    ins = [x.requires_grad_() for x in (q, k, v)]

    def fn(q, k, v):
        out, (h, z) = linear_attention(
            q,
            k,
            v,
            causal=True,
            log_decay=decay if with_decay else None,
            key_padding_mask=kpm,
            return_state=True,
            chunk_size=4,
            backend=backend,
        )
        return out, h, z

    assert torch.autograd.gradcheck(fn, tuple(ins))


@pytest.mark.parametrize("with_state", [False, True])
def test_prefix_matmul_and_cumsum_agree(monkeypatch, with_state):
    """Without decay the chunk states enter through a 0/1 ``(N, N)`` matmul up to ``SCAN_MATMUL_CHUNKS`` chunks and
    a cumsum beyond: both against the recurrence, values and gradients."""
    import importlib

    la = importlib.import_module("efficient_attention.kernels.linear_attention")
    q, k, v, _, state, kpm = make(T=45)
    results = []
    for limit in (1000, 0):
        monkeypatch.setattr(la, "SCAN_MATMUL_CHUNKS", limit)
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        out, (h, z) = linear_attention(
            *ins,
            causal=True,
            key_padding_mask=kpm,
            initial_state=state if with_state else None,
            return_state=True,
            chunk_size=8,
            backend="chunked",
        )
        want, (wh, wz) = recurrence(q, k, v, None, state if with_state else None, kpm)
        torch.testing.assert_close(out, want, **TOL[torch.float64])
        torch.testing.assert_close(z, wz, **TOL[torch.float64])
        (out.sin().sum() + h.sum() + z.sum()).backward()
        results.append([x.grad for x in ins])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_normalised_result_in_out_dtype_is_time_first():
    """``out_dtype``: the normalised result is written in it, in a ``(T, B, H, d)`` memory layout (the heads merge
    without a copy), equal to the fp32 result cast."""
    q, k, v, decay, _, kpm = make(T=40, dtype=torch.float32)
    want = linear_attention(q, k, v, causal=True, log_decay=decay.float(), key_padding_mask=kpm)
    out = linear_attention(
        q, k, v, causal=True, log_decay=decay.float(), key_padding_mask=kpm, out_dtype=torch.bfloat16
    )
    assert out.dtype == torch.bfloat16 and out.permute(2, 0, 1, 3).is_contiguous()
    torch.testing.assert_close(out, want.to(torch.bfloat16))


@NEEDS_CPP
def test_cpp_declines_when_most_threads_would_idle():
    """One thread per (batch, head): with fewer than half as many pairs as threads the chunked path is chosen,
    with the reason; the decision follows the thread count and the batch size (both in the dispatcher's key)."""
    q, k, v, *_ = make(B=1, H=2, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert choose_backend("linear_attention", q, k, v) == "chunked"
        assert any("threads" in r for r in not_supported_reasons("linear_attention", q, k, v)["cpp"])
        q4, k4, v4, *_ = make(B=2, H=2, dtype=torch.float32)
        assert choose_backend("linear_attention", q4, k4, v4) == "cpp"
        torch.set_num_threads(2)
        assert choose_backend("linear_attention", q, k, v) == "cpp"
    finally:
        torch.set_num_threads(threads)
