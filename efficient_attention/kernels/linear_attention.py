"""Chunked linear attention (with an optional per-position scalar decay), the engine of the linear family.

Math (per batch and head; ``q`` ``(T, m)`` query features, ``k`` ``(S, m)`` key features, ``v`` ``(S, d)``):

* causal (``T == S``, query ``t`` aligned with key ``t``): a state ``H (m, d)`` and normaliser ``z (m)``
  run over the positions, ``H_t = e^{g_t} H_{t-1} + k_t v_tᵀ``, ``z_t = e^{g_t} z_{t-1} + k_t``, and
  ``num_t = q_t H_t``, ``den_t = q_t · z_t``.  ``H_0, z_0`` come from ``initial_state`` (zeros by default);
  ``g`` (``log_decay`` ``(B, H, S)``, <= 0 for stability, a constant: no gradient flows into it) is 0
  when not given.  With ``T < S`` the queries are the last ``T`` positions.
* noncausal: ``num_t = q_t (H_0 + Σ_j k_j v_jᵀ)``, ``den_t = q_t · (z_0 + Σ_j k_j)``.

``normalize=True`` returns ``num / den`` (rows with ``den <= 0``, nothing attended, give 0), else
``num``; the normaliser ``z`` is only tracked when normalizing (else states are ``(H, None)``).  The decay
is how a mechanism stabilises exponential features in the log domain: with key
features ``exp(l_j - c_j)`` scaled by a running max ``c`` (non-decreasing), ``g_t = c_{t-1} - c_t`` makes
query ``t`` see ``exp(l_j - c_t)`` (Performer, ABC).  ``return_state=True`` also returns the final
``(H, z)`` (causal: after position ``S``), so a prefill hands its state to decoding.

Backends (``LINEAR_ATTENTION``, a :class:`~efficient_attention.kernels.dispatch.Dispatcher`; its
``not_supported_reasons`` says why one cannot run; ``backend=`` forces one):

* ``"triton"`` -- CUDA: the length is cut into segments run in parallel; one program per (batch, head,
  segment) walks the segment's chunks, masked ``C x C`` product inside a chunk, the state carried in
  registers across chunks (fp32), starting from the state entering the segment (the earlier segments' own
  final states, from a first pass of one product per chunk, summed with their decays); the backward runs
  the chunks backwards for ``dk, dv`` and forwards again for ``dq`` the same way (``_triton_linear.py``),
  under one ``autograd.Function`` (``_LinearFn``) that calls the launch functions directly in eager mode and
  the custom ops ``efficient_attention::triton_linear_attention`` / ``..._bwd`` while ``torch.compile`` traces.
* ``"cpp"`` -- the CPU, fp32 / fp64 (half inputs compute in fp32): the C++ kernels of the ``_C`` extension
  (``csrc/cpu/linear_attention.cpp``), one thread per (batch, head) walking its chunks in order with the state in
  the cache (the backward walks them backwards carrying the state's gradient); the states entering the chunks
  are saved for the backward.  Registered ops ``efficient_attention::linear_causal_fwd`` / ``_bwd`` with fake
  implementations (``_cpu_ops.py``), under one ``autograd.Function`` (``_LinearCppFn``).  The ops also take a
  ``(T, 2)`` cos / sin table and make cosFormer's features ``[act(x) cos, act(x) sin]`` from raw ``q, k`` inside
  the kernel, chunk by chunk (cosFormer calls them so directly: ``attentions/cosformer.py``, ``_CausalCpp``).
* ``"chunked"`` -- any device, PyTorch: the same chunked algorithm with batched matmuls, the states
  entering the chunks from one cumsum (no decay) or one ``(N, N)`` decay-weighted matmul over the ``N``
  chunks; no Python loop.  Half inputs compute in fp32.
* ``"reference"`` -- float64-friendly quadratic masked form, for tests (:func:`reference_linear_attention`).
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Tuple, Union, overload

import torch
from torch import Tensor

from .backends import ChunkedBackend, CppBackend, ReferenceBackend, TritonBackend, cpu_threads
from .dispatch import Dispatcher

__all__ = [
    "linear_attention",
    "reference_linear_attention",
    "chunked_linear_attention",
    "DEFAULT_CHUNK",
    "LINEAR_ATTENTION",
]

DEFAULT_CHUNK = 64  # the chunked backend's chunk length


def cpp_chunk(m: int) -> int:
    """The C++ backend's chunk length for ``m`` features.  At 4096 tokens on 2 threads, forward + backward: 32 is
    10-25% faster than 16 or 64 for 16 features; from 64 features 64 is as fast or faster (cosFormer's 128: 19.9
    against 20.6 ms), and it halves the saved entering states (``w / C`` times the size of the features: at 32 they
    were 34 MB for cosFormer at 4096 tokens, above glibc's 32 MB mmap threshold, so every step faulted them in
    again)."""
    return 64 if m >= 64 else 32


State = Tuple[Tensor, Optional[Tensor]]  # (H, z); z is None with normalize=False


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _divide(num: Tensor, den: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(num / den, den)`` for ``num (B, H, T, d)``, ``den (B, H, T)``: the result in ``dtype`` and a time-first
    ``(T, B, H, d)`` memory layout (so a cast and the copy that merges the heads are not needed), ``den`` with the
    rows that attended nothing (``den <= 0``) set to ``inf`` (their result and gradients are 0).  A division, not a
    product with ``1 / den``: a subnormal denominator has no finite reciprocal."""
    den = torch.where(den > 0, den, float("inf"))
    bsz, heads, length, width = num.shape
    out = torch.empty(length, bsz, heads, width, dtype=dtype, device=num.device)
    torch.div(num.permute(2, 0, 1, 3), den.permute(2, 0, 1).unsqueeze(-1), out=out)
    return out.permute(1, 2, 0, 3), den


def _divide_grads(grad: Tensor, den: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients ``(B, H, T, d)``, ``(B, H, T, 1)`` of ``num`` and ``den`` from :func:`_divide`'s output gradient."""
    grad_num = torch.empty(out.shape, dtype=den.dtype, device=den.device)  # (B, H, T, d) contiguous: the chunked
    torch.div(grad, den.unsqueeze(-1), out=grad_num)  # and Triton backwards read it without a copy
    return grad_num, -(grad_num * out).sum(-1, keepdim=True)  # d(num/den)/d den = -out / den


class _Normalize(torch.autograd.Function):
    """``o[..., :d] / o[..., d]`` in ``dtype`` for ``o (B, H, T, d + 1)`` whose last column is the denominator
    (:func:`_divide`).  One autograd node: forward one division, backward two divisions/products, a sum and one
    ``cat`` back into ``o``'s layout (autograd over slices, ``where``, ``div``, ``masked_fill`` and a cast records
    about three times as many kernels)."""

    @staticmethod
    def forward(ctx, o: Tensor, dtype: torch.dtype) -> Tensor:
        out, den = _divide(o[..., :-1], o[..., -1], dtype)
        ctx.save_for_backward(den, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.cat(_divide_grads(grad, *ctx.saved_tensors), dim=-1), None


class _Divide(torch.autograd.Function):
    """``num / den`` (:func:`_divide`) for ``num (B, H, T, d)`` and ``den (B, H, T)`` as one autograd node."""

    @staticmethod
    def forward(ctx, num: Tensor, den: Tensor, dtype: torch.dtype) -> Tensor:
        out, den = _divide(num, den, dtype)
        ctx.save_for_backward(den, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_num, grad_den = _divide_grads(grad, *ctx.saved_tensors)
        return grad_num, grad_den.squeeze(-1), None


SPLIT_K_DEVICES = ("cuda",)  # device types whose long reductions split (benchmarks/host_ops.py adds "cpu")


def _split_k(length: int, x: Tensor) -> int:
    """Chunks to split a length-``length`` reduction of a ``(m, L) @ (L, d)`` product into on CUDA (1: none).

    Such a product has one output tile per (batch, head), so cuBLAS runs ``B*H`` programs over the whole length
    (0.6 ms at 8k in CAB's setting on an H200); chunks of 512 turn it into ``B*H*L/512`` products and a sum."""
    if x.device.type not in SPLIT_K_DEVICES or length < 2048:
        return 1
    for chunk in (512, 256, 128):
        if length % chunk == 0:
            return length // chunk
    return 1


def _sum_products(kt: Tensor, v: Tensor) -> Tensor:
    """``kt @ v`` for ``kt (B, H, m, S)``, ``v (B, H, S, d)``, the length split by :func:`_split_k`."""
    n = _split_k(v.shape[-2], v)
    if n == 1:
        return torch.matmul(kt, v)
    bsz, heads, m, seq = kt.shape
    chunks = kt.reshape(bsz, heads, m, n, seq // n).transpose(2, 3)
    return torch.matmul(chunks, v.reshape(bsz, heads, n, seq // n, v.shape[-1])).sum(2)


def _broadcast_product(q: Tensor, state: Tensor) -> Tensor:
    """``q @ state`` for ``q (B, H, T, m)``, ``state (B, H, m, d)``; split into chunks of queries like
    :func:`_sum_products`, so the backward's ``qᵀ @ grad`` (the same long reduction) is split too."""
    n = _split_k(q.shape[-2], q)
    if n == 1:
        return torch.matmul(q, state)
    bsz, heads, seq, m = q.shape
    out = torch.matmul(q.reshape(bsz, heads, n, seq // n, m), state.unsqueeze(2))
    return out.view(bsz, heads, seq, state.shape[-1])


# ----------------------------------------------------------------------------- reference (quadratic)
def reference_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    initial_state: Optional[Tuple[Tensor, Tensor]],
    causal: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(num (B,H,T,d), den (B,H,T), H (B,H,m,d), z (B,H,m))`` by the quadratic masked form (aligned, T == S
    when causal).  Simple and obviously right; run it in float64 for tests."""
    dt = _acc(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    bsz, heads, seq, m = k.shape
    h0 = q.new_zeros(bsz, heads, m, v.shape[-1]) if initial_state is None else initial_state[0].to(dt)
    z0 = q.new_zeros(bsz, heads, m) if initial_state is None else initial_state[1].to(dt)
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, S)
    if not causal:
        hf, zf = h0 + torch.matmul(k.transpose(-1, -2), v), z0 + k.sum(-2)
        return torch.matmul(q, hf), torch.matmul(q, zf.unsqueeze(-1)).squeeze(-1), hf, zf
    cum = torch.zeros(bsz, heads, seq, dtype=dt, device=q.device) if log_decay is None else log_decay.to(dt).cumsum(-1)
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    weight = torch.exp((cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(future, float("-inf")))  # e^{G_t - G_j}
    a = scores * weight
    start = torch.exp(cum)  # (B, H, T): what is left of the initial state at t
    num = torch.matmul(a, v) + start.unsqueeze(-1) * torch.matmul(q, h0)
    den = a.sum(-1) + start * torch.matmul(q, z0.unsqueeze(-1)).squeeze(-1)
    to_end = torch.exp(cum[..., -1:] - cum) if seq else cum  # (B, H, S)
    kd = k * to_end.unsqueeze(-1)
    last = start[..., -1:] if seq else torch.ones_like(z0[..., :1])
    hf = last.unsqueeze(-1) * h0 + torch.matmul(kd.transpose(-1, -2), v)
    zf = last * z0 + kd.sum(-2)
    return num, den, hf, zf


# ------------------------------------------------------------------------------- chunked (PyTorch)
SCAN_MATMUL_CHUNKS = 128  # up to this many chunks the no-decay prefix sum is a matmul (CPU cumsum: ~14 ns/element)


def chunked_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    state: Optional[Tensor],
    chunk_size: int,
    z_state: Optional[Tensor] = None,
    normalize: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """Causal, aligned (``T == S``): ``(num (B,H,T,d), den (B,H,T), H_final (B,H,m,d), z_final (B,H,m))`` in
    fp32/fp64; ``den`` and ``z_final`` are None unless ``normalize`` (then ``z_state`` is the initial normaliser,
    None: zeros).

    Chunks of ``C = chunk_size``: inside a chunk the masked ``(C, C)`` product ``A`` (``num += A v``,
    ``den += A 1``); the state entering chunk ``n`` is ``Σ_{p<n} e^{L_{n-1} - L_p} U_p + e^{L_{n-1}} H_0`` with
    ``U_p`` chunk ``p``'s contribution (``z`` the same way from the key sums) and ``L`` the cumulative log decay
    at chunk ends: one ``(N, N)`` (decay-weighted or 0/1) matmul over the ``N`` chunks, or a cumsum past
    ``SCAN_MATMUL_CHUNKS`` chunks without decay.  All exponents are <= 0 when ``log_decay <= 0``.
    """
    dt = _acc(q.dtype)
    bsz, heads, seq, m = q.shape
    d = v.shape[-1]
    c = int(chunk_size)
    n = -(-seq // c)
    pad = n * c - seq

    def chunks(x: Tensor) -> Tensor:
        x = x.to(dt)
        return (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x).reshape(bsz, heads, n, c, x.shape[-1])

    q, k, v = chunks(q), chunks(k), chunks(v)
    future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    a = torch.matmul(q, k.transpose(-1, -2))  # (B, H, N, C, C); masked and weighted in place below
    if log_decay is None:
        a.masked_fill_(future, 0.0)
        kd, qd, decays = k, q, None
    else:
        g = log_decay.to(dt)
        g = (torch.nn.functional.pad(g, (0, pad)) if pad else g).view(bsz, heads, n, c)
        cum = g.cumsum(-1)  # G within the chunk (B, H, N, C)
        gl = cum[..., -1]  # (B, H, N): the chunk's total log decay
        a.mul_((cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill_(future, float("-inf")).exp_())
        kd = k * torch.exp(gl.unsqueeze(-1) - cum).unsqueeze(-1)
        qd = q * torch.exp(cum).unsqueeze(-1)
        decays = gl
    num = torch.matmul(a, v)
    u = torch.matmul(kd.transpose(-1, -2), v)  # (B, H, N, m, d)
    if normalize:  # z rides along as a last column of the chunk states (not of v: (N, m), not (T, 1))
        u = torch.cat([u, kd.sum(-2).unsqueeze(-1)], dim=-1)
        if state is not None or z_state is not None:
            h0 = state.to(dt) if state is not None else u.new_zeros(bsz, heads, m, d)
            z0 = z_state.to(dt) if z_state is not None else u.new_zeros(bsz, heads, m)
            state = torch.cat([h0, z0.unsqueeze(-1)], dim=-1)
    h_in, final = _entering_states(u, decays, state)
    res = torch.matmul(qd, h_in)  # (B, H, N, C, d (+ 1))
    if not normalize:
        return (num + res).view(bsz, heads, n * c, d)[:, :, :seq], None, final, None
    num = (num + res[..., :d]).view(bsz, heads, n * c, d)[:, :, :seq]
    den = (a.sum(-1) + res[..., d]).view(bsz, heads, n * c)[:, :, :seq]
    return num, den, final[..., :d], final[..., d]


def _entering_states(u: Tensor, decays: Optional[Tensor], x0: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(entering (B, H, N, ...), final (B, H, ...))``: the states entering the ``N`` chunks and the one after the
    last, from the chunks' own contributions ``u (B, H, N, ...)``, their total log decays ``decays (B, H, N)``
    (None: no decay) and the initial state ``x0 (B, H, ...)`` (None: zeros).  One ``(N, N)`` matmul (decay-weighted
    or 0/1), or a cumsum past ``SCAN_MATMUL_CHUNKS`` chunks without decay."""
    bsz, heads, n = u.shape[:3]
    ones = [1] * (u.dim() - 3)  # broadcasts a (B, H, N) factor over the state's dims
    if decays is None:
        if n > SCAN_MATMUL_CHUNKS:
            run = torch.cumsum(u, dim=2)
            into = torch.cat([torch.zeros_like(run[:, :, :1]), run[:, :, :-1]], dim=2)
        else:
            strict = torch.ones(n, n, dtype=u.dtype, device=u.device).tril(-1)
            into = torch.matmul(strict, u.flatten(3)).view(u.shape)
        final = into[:, :, -1] + u[:, :, -1]
        if x0 is not None:
            x0 = x0.to(u.dtype)
            into, final = into + x0.unsqueeze(2), final + x0
        return into, final
    ends = decays.cumsum(-1)  # L_n (B, H, N)
    before = ends - decays  # L_{n-1} (L_{-1} = 0)
    strict = torch.ones(n, n, dtype=torch.bool, device=u.device).tril(-1)  # chunk p < chunk n
    mix = torch.exp((before.unsqueeze(-1) - ends.unsqueeze(-2)).masked_fill_(~strict, float("-inf")))  # (B, H, N, N)
    into = torch.matmul(mix, u.flatten(3)).view(u.shape)
    final = into[:, :, -1] * torch.exp(decays[..., -1]).view(bsz, heads, *ones) + u[:, :, -1]
    if x0 is not None:
        x0 = x0.to(u.dtype)
        into = into + torch.exp(before).view(bsz, heads, n, *ones) * x0.unsqueeze(2)
        final = final + torch.exp(ends[..., -1]).view(bsz, heads, *ones) * x0
    return into, final


# -------------------------------------------------------------------------- Triton custom op
TILE_LIMIT = 128 * 128  # BLOCK_M * BLOCK_D: the fp32 state tile one program holds in registers
MIN_SEGMENT_CHUNKS = 8  # a segment walks at least this many chunks (else its entering-state sum costs more)


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def _triton_config(m: int, d: int, dtype: torch.dtype, bh: int, sms: int, seq: int) -> dict:
    """Tiles and segments for ``(bh, seq, m)`` features and ``d`` value columns on a GPU of ``sms`` SMs.

    The whole feature dim per program (``BLOCK_M``) and all value columns too (``BLOCK_D``) while the state tile
    stays within ``TILE_LIMIT`` (a quarter of it for fp32 inputs, whose sm_90 compile spills kilobytes and takes
    minutes at 128 x 64): then ``q kᵀ`` is computed once per chunk and ``dq, dk`` are written whole (more
    value blocks each recompute ``q kᵀ`` and leave partial ``dq, dk`` to sum).  The normaliser is a vector beside
    the state (no ones column of ``v``), so ``d = 64`` is one 64-wide block.  Chunks of 64 positions (32 for wide
    fp32 features or more than 64 value columns: fewer registers spilled in an sm_90 compile).  The length is cut
    into ``SEG``-position segments run in parallel, up to about two programs per SM, each of at least
    ``MIN_SEGMENT_CHUNKS`` chunks (one segment: the plain chunk walk).  H200, fwd + bwd at 32k, B*H = 32, with the
    former ones column (d = 64 + 1, chunks of 32; ``benchmarks/linear_attention_gpu.py --sweep``): half or twice
    the segments are no faster (m = 16: 5.15 / 3.80 / 3.85 ms, m = 128: 6.84 / 6.66 / 6.87); 4 warps beat 8 at
    128 x 64 (6.16 ms) and at 16 x 64 (3.80 against 5.58)."""
    block_m = _pow2(m)
    limit = TILE_LIMIT if dtype != torch.float32 else TILE_LIMIT // 4  # fp32 products run on CUDA cores
    block_d = _pow2(d)
    while block_m * block_d > limit and block_d > 16:
        block_d //= 2
    block_c = 64 if block_m * (4 if dtype == torch.float32 else 2) <= 256 and block_d <= 64 else 32
    n_d = -(-d // block_d)
    chunks = max(1, -(-seq // block_c))
    segments = max(1, min(2 * sms // (bh * n_d), chunks // MIN_SEGMENT_CHUNKS))
    per_segment = -(-chunks // segments)
    return dict(
        BLOCK_C=block_c,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=8 if block_m * block_d > 128 * 64 or block_d > 64 else 4,
        SEG=per_segment * block_c,
    )


_SMS: dict = {}


def _checked_config(cfg: dict, m: int, d: int) -> dict:
    """``cfg`` after the bounds every kernel relies on (a ``ValueError`` naming the key, never a launch that reads
    or writes outside its tensors): whole features per program, power-of-two tiles, segments of whole chunks.
    (The former 16-wide tail tile of the normaliser's ones column, which once hit an illegal memory access beside
    chunks of 64, is gone: the normaliser is a vector beside the state.)"""
    bc, bm, seg = cfg["BLOCK_C"], cfg["BLOCK_M"], cfg["SEG"]
    for key in ("BLOCK_C", "BLOCK_M", "BLOCK_D"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"linear attention config: {key}={cfg[key]} must be a power of two >= 16")
    if bm < m:
        raise ValueError(f"linear attention config: BLOCK_M={bm} below the {m} features")
    if seg <= 0 or seg % bc:
        raise ValueError(f"linear attention config: SEG={seg} must be a positive multiple of BLOCK_C={bc}")
    if set(cfg) != {"BLOCK_C", "BLOCK_M", "BLOCK_D", "num_warps", "SEG"}:
        raise ValueError(f"linear attention config: unknown keys {sorted(set(cfg) - {'SEG', 'num_warps'})}")
    return cfg


def _config(q: Tensor, m: int, d: int, feat: int = 0) -> dict:
    """:func:`_triton_config` for ``q``'s device, checked.  With ``feat`` (features made in the kernels) in fp16 /
    bf16, value tiles below 64 take chunks of 32: on an H200 (Triton 3.6) chunks of 64 with 4 warps gave wrong
    results there (0.5 relative error at head dim 32, an illegal memory access at 5k positions, a 5e-2 ``dq``
    error at 16), while chunks of 32, 8 warps or 64-wide value tiles each matched float64 at every head dim
    (``results/h200/session9/feat_*.log``, ``cosformer_fused_check_267605e.*``; a compiler fault with operands
    made in registers, not understood)."""
    if q.device not in _SMS:
        _SMS[q.device] = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    cfg = dict(_triton_config(m, d, q.dtype, q.shape[0] * q.shape[1], _SMS[q.device], q.shape[2]))
    if feat and q.dtype != torch.float32 and cfg["BLOCK_D"] < 64 and cfg["BLOCK_C"] > 32:
        cfg["BLOCK_C"] = 32  # (SEG stays a multiple of it)
    return _checked_config(cfg, m, d)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, *x.shape[2:]).contiguous()


def _readable(x: Tensor) -> bool:
    """Whether the kernels read ``x (B, H, T, d)`` in place: ``bh * s_bh + t * s_t + column``, which covers the
    contiguous and the time-first layout."""
    return x.stride(-1) == 1 and x.stride(0) == x.shape[1] * x.stride(1)


def _row_strides(x: Tensor) -> Tuple[int, int]:
    """``(s_bh, s_t)`` of ``x`` as :func:`_rows` hands it to the kernels (a contiguous copy's where it copies)."""
    return (x.stride(1), x.stride(2)) if _readable(x) else (x.shape[2] * x.shape[3], x.shape[3])


def _qk_strides(q: Tensor, k: Tensor) -> Tuple[int, int]:
    """The strides :func:`_qk_rows` hands the kernels for ``q`` and ``k``."""
    strides = _row_strides(q)
    return strides if strides == _row_strides(k) else (q.shape[2] * q.shape[3], q.shape[3])


def _rows(x: Tensor) -> Tuple[Tensor, int, int]:
    """``x (B, H, T, d)`` as the kernels read it (:func:`_readable`; a contiguous copy of other layouts) and its
    two strides."""
    x = x if _readable(x) else x.contiguous()
    return x, x.stride(1), x.stride(2)


def _qk_rows(q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor, int, int]:
    """``q, k`` as :func:`_rows` gives them, with the strides they share (both copied contiguous when their
    layouts differ)."""
    q, s_bh, s_t = _rows(q)
    k, sk_bh, sk_t = _rows(k)
    if (s_bh, s_t) != (sk_bh, sk_t):
        q, k = q.contiguous(), k.contiguous()
        s_bh, s_t = q.stride(1), q.stride(2)
    return q, k, s_bh, s_t


def _grad_rows(x: Tensor, strides: Tuple[int, int], dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised gradient for ``x (B, H, T, w)`` read with ``strides`` (``(s_bh, s_t)``): in a time-first
    ``(T, B, H, w)`` memory layout where ``x`` is read that way (the heads of a time-first projection: autograd's
    permute back to the projection is then a view, not a copy), else contiguous."""
    bsz, heads, seq, width = x.shape
    dtype = x.dtype if dtype is None else dtype
    if strides[1] > strides[0]:
        return torch.empty(seq, bsz, heads, width, device=x.device, dtype=dtype).permute(1, 2, 0, 3)
    return torch.empty(bsz, heads, seq, width, device=x.device, dtype=dtype)


def _features_of(q: Tensor, cos_sin: Optional[Tensor], act: int) -> Tuple[int, int]:
    """``(m, FEAT)``: the kernels' feature count and feature mode (0: ``q`` holds the features; 1 / 2: cosFormer's
    from the raw rows with relu / 1 + elu, twice as many)."""
    if cos_sin is None:
        return q.shape[-1], 0
    if act not in (0, 1):
        raise ValueError(f"act must be 0 (relu) or 1 (1 + elu) with cos_sin, got {act!r}")
    if cos_sin.shape != (q.shape[2], 2) or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError(
            f"cos_sin must be a contiguous float32 (T, 2) = {(q.shape[2], 2)} table, got "
            f"{cos_sin.dtype} {tuple(cos_sin.shape)}"
        )
    return 2 * q.shape[-1], 1 + act


def _out_buffer(q: Tensor, d: int, dtype: torch.dtype, time_first: bool) -> Tensor:
    bsz, heads, seq, _ = q.shape
    if time_first:
        return torch.empty(seq, bsz, heads, d, device=q.device, dtype=dtype).permute(1, 2, 0, 3)
    return torch.empty(bsz, heads, seq, d, device=q.device, dtype=dtype)


def linear_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    state: Optional[Tensor],
    z_state: Optional[Tensor],
    normalize: bool,
    out_dtype: torch.dtype,
    time_first: bool,
    cos_sin: Optional[Tensor] = None,
    act: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Causal aligned linear attention on CUDA: ``(o (B,H,T,d), den (B,H,T) fp32, H_final (B,H,m,d) fp32,
    z_final (B,H,m) fp32)``.  ``normalize``: ``o = num / den`` (0 where ``den <= 0``), the normaliser ``z`` carried
    beside the state from ``z_state`` (None: zeros); else ``o = num`` and ``den``, ``z_final`` are empty.  ``o`` is
    in ``out_dtype``, in a ``(T, B, H, d)`` memory layout when ``time_first``.  With ``cos_sin`` ``(T, 2)`` fp32
    (``cos θ_t, sin θ_t``), ``q, k`` are raw ``(B, H, T, r)`` rows and the kernels make cosFormer's ``m = 2r``
    features from them (``act`` 0: relu, 1: 1 + elu; the states' features interleaved, ``[cos, sin]`` per
    column)."""
    import triton

    from . import _triton_linear as kern
    from ._triton_common import launch

    bsz, heads, seq, _ = q.shape
    m, feat = _features_of(q, cos_sin, act)
    d = v.shape[-1]
    bh = bsz * heads
    cfg = _config(q, m, d, feat)
    seg = cfg.pop("SEG")
    nseg = triton.cdiv(seq, seg)
    grid = (triton.cdiv(d, cfg["BLOCK_D"]), nseg, bh)
    qf, kf, sq_bh, sq_t = _qk_rows(q, k)
    vf, sv_bh, sv_t = _rows(v)
    o = _out_buffer(q, d, out_dtype, time_first)
    s_bh, s_t = o.stride(1), o.stride(2)
    final = torch.empty(bsz, heads, m, d, device=q.device, dtype=torch.float32)
    den = q.new_empty((bsz, heads, seq) if normalize else (0,), dtype=torch.float32)
    zf = q.new_empty((bsz, heads, m) if normalize else (0,), dtype=torch.float32)
    g = _flat(log_decay.float()) if log_decay is not None else final
    h0 = _flat(state.float()) if state is not None else final
    z0 = _flat(z_state.float()) if normalize and z_state is not None else final
    cs = final if cos_sin is None else cos_sin
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    flags: Dict[str, Any] = dict(HAS_G=log_decay is not None, NORM=normalize, FEAT=feat, PREC=prec, **cfg)
    strides = (sq_bh, sq_t, sv_bh, sv_t)
    u = uz = gs = final  # the segments' own final states and total log decays (unused with one segment)
    if nseg > 1:
        u = torch.empty(bh, nseg, m, d, device=q.device, dtype=torch.float32)
        uz = torch.empty(bh, nseg, m, device=q.device, dtype=torch.float32) if normalize else u
        gs = torch.empty(bh, nseg, device=q.device, dtype=torch.float32) if log_decay is not None else u
        launch(
            kern._seg_states,
            grid,
            (qf, kf, vf, g, cs, u, u, u, u, uz, u, uz, gs),
            (seq, m, d, *strides, 0, 0, seg, nseg),
            dict(STORE_W=False, **flags),
        )
    launch(
        kern._fwd,
        grid,
        (qf, kf, vf, g, cs, h0, z0, u, uz, gs, o, den, final, zf),
        (seq, m, d, *strides, s_bh, s_t, seg, nseg),
        dict(HAS_H0=state is not None, STORE_HT=True, **flags),
    )
    return o, den, final, zf


triton_linear_attention = torch.library.custom_op(
    "efficient_attention::triton_linear_attention", linear_fwd, mutates_args=()
)


@triton_linear_attention.register_fake
def _(q, k, v, log_decay, state, z_state, normalize, out_dtype, time_first, cos_sin=None, act=0):
    shape = (*q.shape[:2], _features_of(q, cos_sin, act)[0])
    return (
        _out_buffer(q, v.shape[-1], out_dtype, time_first),
        q.new_empty(*q.shape[:3], dtype=torch.float32) if normalize else q.new_empty(0, dtype=torch.float32),
        q.new_empty(*shape, v.shape[-1], dtype=torch.float32),
        q.new_empty(*shape, dtype=torch.float32) if normalize else q.new_empty(0, dtype=torch.float32),
    )


def linear_bwd(
    grad_o: Tensor,
    grad_final: Optional[Tensor],
    grad_z: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor],
    state: Optional[Tensor],
    z_state: Optional[Tensor],
    o: Tensor,
    den: Tensor,
    normalize: bool,
    cos_sin: Optional[Tensor] = None,
    act: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, d_state, d_z_state)`` of :func:`linear_fwd` (``grad_final`` / ``grad_z`` None:
    the final state / normaliser got no gradient; ``o``, ``den`` its outputs; ``d_state`` uninitialised when there
    is no state, ``d_z_state`` when there is none or no normaliser).  The output gradient is read in its dtype and
    layout; no ``(B, H, T, d)`` fp32 buffer.  With ``cos_sin``, ``dq, dk`` are the raw rows' gradients."""
    import triton

    from . import _triton_linear as kern
    from ._triton_common import launch

    bsz, heads, seq, width = q.shape
    m, feat = _features_of(q, cos_sin, act)
    d = v.shape[-1]
    bh = bsz * heads
    cfg = _config(q, m, d, feat)
    seg = cfg.pop("SEG")
    nseg = triton.cdiv(seq, seg)
    n_d = triton.cdiv(d, cfg["BLOCK_D"])
    grid = (n_d, nseg, bh)
    qf, kf, sq_bh, sq_t = _qk_rows(q, k)
    vf, sv_bh, sv_t = _rows(v)
    grad_o, s_bh, s_t = _rows(grad_o)
    f32: Dict[str, Any] = dict(device=q.device, dtype=torch.float32)
    g = _flat(log_decay.float()) if log_decay is not None else qf
    h0 = _flat(state.float()) if state is not None else qf
    z0 = _flat(z_state.float()) if normalize and z_state is not None else qf
    gd = qf
    if normalize:  # the gradient reaching the denominator, -(dO · o) / den per row
        gd = torch.empty(bh, seq, **f32)
        o, so_bh, so_t = _rows(o)
        block = _pow2(d)
        rows = max(16, 4096 // block)
        launch(
            kern._den_grad,
            (triton.cdiv(seq, rows), bh),
            (grad_o, o, den, gd),
            (seq, d, s_bh, s_t, so_bh, so_t),
            dict(ROWS=rows, BLOCK_D=block),
        )
    # the gradients in the layouts the kernels read the inputs in (time-first heads stay time-first)
    dv = _grad_rows(v, (sv_bh, sv_t))
    if n_d == 1:  # dq, dk whole: written once, in the input dtype
        dq, dk = _grad_rows(q, (sq_bh, sq_t)), _grad_rows(k, (sq_bh, sq_t))
        grad_strides = (0, dq.stride(1), dq.stride(2))  # dq, dk: value blocks, heads, rows
    else:  # a partial fp32 dq, dk per value block (features too wide for one state tile), summed below
        dk = torch.empty(n_d, bh, seq, width, **f32)
        dq = torch.empty_like(dk)
        grad_strides = (bh * seq * width, seq * width, width)
    dh0 = (torch.zeros if state is not None else torch.empty)(bh, m, d, **f32)
    dz0 = torch.zeros(bh, m, **f32) if state is not None and normalize else dh0
    cs = qf if cos_sin is None else cos_sin
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    flags: Dict[str, Any] = dict(HAS_G=log_decay is not None, NORM=normalize, FEAT=feat, PREC=prec, **cfg)
    strides = (sq_bh, sq_t, sv_bh, sv_t)
    dht = _flat(grad_final.float()) if grad_final is not None else qf
    dzt = _flat(grad_z.float()) if grad_z is not None and normalize else dh0
    if grad_final is None and grad_z is not None and normalize:  # only z got a gradient: H's is zero
        dht = torch.zeros(bh, m, d, **f32)
    has_dht = grad_final is not None or (grad_z is not None and normalize)
    if has_dht and normalize and grad_z is None:
        dzt = torch.zeros(bh, m, **f32)
    u = uz = w = wz = gs = dh0  # the segments' own final states, entering-state gradients and log decays
    if nseg > 1:
        u = torch.empty(bh, nseg, m, d, **f32)
        w = torch.empty_like(u)
        uz = torch.empty(bh, nseg, m, **f32) if normalize else u
        wz = torch.empty_like(uz)
        gs = torch.empty(bh, nseg, **f32) if log_decay is not None else u
        launch(
            kern._seg_states,
            grid,
            (qf, kf, vf, g, cs, grad_o, den, gd, u, uz, w, wz, gs),
            (seq, m, d, *strides, s_bh, s_t, seg, nseg),
            dict(STORE_W=True, **flags),
        )
    launch(
        kern._bwd_dkdv,
        grid,
        (qf, kf, vf, g, cs, grad_o, den, gd, dht, dzt, w, wz, gs, dk, dv, dh0, dz0),
        (seq, m, d, *strides, *grad_strides, dv.stride(1), dv.stride(2), s_bh, s_t, seg, nseg),
        dict(HAS_DHT=has_dht, STORE_DH0=state is not None, **flags),
    )
    launch(
        kern._bwd_dq,
        grid,
        (qf, kf, vf, g, cs, h0, z0, u, uz, gs, grad_o, den, gd, dq),
        (seq, m, d, *strides, *grad_strides, s_bh, s_t, seg, nseg),
        dict(HAS_H0=state is not None, **flags),
    )
    if n_d > 1:
        shape = (bsz, heads, seq, width)
        dq = _grad_rows(q, (sq_bh, sq_t)).copy_(dq.sum(0).view(shape))
        dk = _grad_rows(k, (sq_bh, sq_t)).copy_(dk.sum(0).view(shape))
    dz0 = dz0.view(bsz, heads, m) if state is not None and normalize else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dh0.view(bsz, heads, m, d), dz0


triton_linear_attention_bwd = torch.library.custom_op(
    "efficient_attention::triton_linear_attention_bwd", linear_bwd, mutates_args=()
)


@triton_linear_attention_bwd.register_fake
def _(grad_o, grad_final, grad_z, q, k, v, log_decay, state, z_state, o, den, normalize, cos_sin=None, act=0):
    with_z = state is not None and normalize
    m = _features_of(q, cos_sin, act)[0]
    qk_strides = _qk_strides(q, k)
    return (
        _grad_rows(q, qk_strides),
        _grad_rows(k, qk_strides),
        _grad_rows(v, _row_strides(v)),
        q.new_empty(*q.shape[:2], m, v.shape[-1], dtype=torch.float32),
        q.new_empty(*q.shape[:2], m, dtype=torch.float32) if with_z else q.new_empty(0, dtype=torch.float32),
    )


# -- the autograd wiring: eager calls run the functions above directly (a call through torch.library's custom-op
# dispatcher cost ~0.5 ms of host time on an H200's host, twice a training step: the module is host-bound below
# 8k tokens); while compiling, the registered ops, opaque to the compiler with their fake implementations
def _linear_ops():
    """``(forward, backward)``: the registered ops while compiling, else the plain launch functions."""
    if torch.compiler.is_compiling():
        return (
            torch.ops.efficient_attention.triton_linear_attention,
            torch.ops.efficient_attention.triton_linear_attention_bwd,
        )
    return linear_fwd, linear_bwd


class _LinearFn(torch.autograd.Function):
    """:func:`linear_fwd` with :func:`linear_bwd` as its backward (``den`` gets no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, state, z_state, normalize, out_dtype, time_first, cos_sin=None, act=0):
        fwd, _ = _linear_ops()
        o, den, final, zf = fwd(q, k, v, log_decay, state, z_state, normalize, out_dtype, time_first, cos_sin, act)
        ctx.set_materialize_grads(False)  # an unused final state gets no zero gradient (and no work)
        ctx.mark_non_differentiable(den)
        saved = (q, k, v, log_decay, state, z_state, o if normalize else None, den if normalize else None, cos_sin)
        ctx.save_for_backward(*saved)
        ctx.normalize, ctx.act = normalize, act
        return o, den, final, zf

    @staticmethod
    def backward(ctx, grad_o, grad_den, grad_final, grad_z):
        q, k, v, log_decay, state, z_state, o, den, cos_sin = ctx.saved_tensors
        normalize = ctx.normalize
        _, bwd = _linear_ops()
        if grad_o is None:
            grad_o = q.new_zeros(*q.shape[:3], v.shape[-1])
        if not normalize:
            o = den = grad_o  # unread
        dq, dk, dv, dh0, dz0 = bwd(
            grad_o,
            grad_final,
            grad_z if normalize else None,
            q,
            k,
            v,
            log_decay,
            state,
            z_state,
            o,
            den,
            normalize,
            cos_sin,
            ctx.act,
        )
        d_state = dh0.to(state.dtype) if state is not None else None
        d_z = dz0.to(z_state.dtype) if z_state is not None and normalize else None
        return dq, dk, dv, None, d_state, d_z, None, None, None, None, None


# ----------------------------------------------------------------------------------------- backends
LINEAR_MAX_FEATURES = 256
LINEAR_MIN_FEATURES = 16  # fewer are zero-padded to 16 (exact) before the kernels
LINEAR_MIN_POSITIONS = 16
LINEAR_MAX_VALUE_DIM = 128


class LinearTriton(TritonBackend):
    """Causal, aligned (q padded to k's length); the normaliser in-kernel (:meth:`run_fused`)."""

    op = "linear_attention"

    @classmethod
    def input_reasons(cls, q, k, v):
        reasons = []
        if q.shape[2] < LINEAR_MIN_POSITIONS:
            reasons.append(
                f"{q.shape[2]} positions (a decoding step): fewer than {LINEAR_MIN_POSITIONS}, where the "
                "batched PyTorch path is cheaper and the kernels are not checked"
            )
        if q.shape[-1] > LINEAR_MAX_FEATURES:
            reasons.append(f"{q.shape[-1]} features: the kernels hold at most {LINEAR_MAX_FEATURES} per program")
        if v.shape[-1] > LINEAR_MAX_VALUE_DIM:
            reasons.append(f"value dim {v.shape[-1]} is above {LINEAR_MAX_VALUE_DIM}")
        return reasons

    @staticmethod
    def run_fused(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_decay: Optional[Tensor],
        h0: Optional[Tensor],
        z0: Optional[Tensor],
        normalize: bool,
        out_dtype: torch.dtype,
        time_first: bool,
        cos_sin: Optional[Tensor] = None,
        act: int = 0,
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(out, H_final, z_final or None)``: normalised (or not) in the kernels, ``out`` in ``out_dtype``.
        ``cos_sin``, ``act``: cosFormer's features made in the kernels from raw ``q, k`` (:func:`linear_fwd`;
        at least :data:`LINEAR_MIN_FEATURES` of them, the states' features interleaved)."""
        h0 = None if h0 is None else h0.float()
        z0 = None if z0 is None or not normalize else z0.float()
        if cos_sin is not None:
            o, _, final, zf = _LinearFn.apply(
                q, k, v, log_decay, h0, z0, normalize, out_dtype, time_first, cos_sin, act
            )
            return o, final, (zf if normalize else None)
        m = q.shape[-1]
        if m < LINEAR_MIN_FEATURES:  # zero features add nothing: exact, and the kernels see a full 16-wide tile
            pad = LINEAR_MIN_FEATURES - m
            q, k = (torch.nn.functional.pad(x, (0, pad)) for x in (q, k))
            h0 = None if h0 is None else torch.nn.functional.pad(h0, (0, 0, 0, pad))
            z0 = None if z0 is None else torch.nn.functional.pad(z0, (0, pad))
        o, _, final, zf = _LinearFn.apply(q, k, v, log_decay, h0, z0, normalize, out_dtype, time_first)
        return o, final[..., :m, :], (zf[..., :m] if normalize else None)

    @staticmethod
    def run(q, k, v, log_decay, state, chunk_size):
        """The unnormalised interface of the other backends: ``(o fp32, H_final fp32)``."""
        o, final, _ = LinearTriton.run_fused(q, k, v, log_decay, state, None, False, torch.float32, False)
        return o, final


def _finish(num: Tensor, den: Optional[Tensor], final: Tensor, zf: Optional[Tensor], normalize: bool, out_dtype):
    """``(out, H_final, z_final or None)`` of the CPU backends from their ``(num, den, H_final, z_final)``."""
    if normalize:
        return _Divide.apply(num, den, out_dtype or num.dtype), final, zf
    return (num if out_dtype is None else num.to(out_dtype)), final, None


class _LinearCppFn(torch.autograd.Function):
    """The C++ kernels with autograd: ``(num, den, H_final, z_final)`` for contiguous fp32 / fp64 ``q, k (B, H, T,
    m)``, ``v (B, H, T, d)``, ``log_decay (B, H, T)`` or None, ``h0 (B, H, m, d)`` / ``z0 (B, H, m)`` or None;
    ``den`` and ``z_final`` are empty tensors unless ``normalize``.  Saves the inputs and the states entering the
    chunks (``(B, H, T / chunk, d + normalize, m)``)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, h0, z0, normalize, chunk):
        num, den, states, final, zf = torch.ops.efficient_attention.linear_causal_fwd(
            q, k, v, log_decay, h0, z0, normalize, chunk
        )
        ctx.set_materialize_grads(False)  # an unused output gets no zero gradient
        ctx.save_for_backward(q, k, v, log_decay, states)
        ctx.args = (normalize, chunk, h0 is not None, z0 is not None)
        if not normalize:
            ctx.mark_non_differentiable(den, zf)
        return num, den, final, zf

    @staticmethod
    def backward(ctx, grad_num, grad_den, grad_final, grad_z):
        q, k, v, log_decay, states = ctx.saved_tensors
        normalize, chunk, has_h0, has_z0 = ctx.args
        if not normalize:
            grad_den = grad_z = None
        dq, dk, dv, dh0, dz0 = torch.ops.efficient_attention.linear_causal_bwd(
            grad_num, grad_den, grad_final, grad_z, q, k, v, log_decay, states, normalize, chunk
        )
        return dq, dk, dv, None, dh0 if has_h0 else None, dz0 if has_z0 and normalize else None, None, None


class LinearCpp(CppBackend):
    op = "linear_attention"
    description = "C++ CPU kernels: one thread per (batch, head) walks the chunks with the state in the cache"

    @classmethod
    def input_reasons(cls, q, k, v):
        # one thread per (batch, head) pair, each about 2.2x as fast as a thread of the chunked path's batched
        # matmuls (4096 tokens, 16-128 features): with fewer than half as many pairs as threads the chunked path
        # may be the faster one
        pairs, threads = q.shape[0] * q.shape[1], cpu_threads()
        if q.device.type == "cpu" and 2 * pairs < threads:
            return [
                f"{pairs} (batch, head) pairs for {threads} threads: the C++ kernel runs one thread per pair, the "
                "chunked path's batched matmuls use every thread"
            ]
        return []

    @staticmethod
    def run_fused(q, k, v, log_decay, h0, z0, normalize, out_dtype, chunk_size):
        """``(out, H_final, z_final or None)`` (see :class:`LinearChunked`)."""
        dt = _acc(q.dtype)
        q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
        log_decay, h0 = (None if x is None else x.to(dt).contiguous() for x in (log_decay, h0))
        z0 = None if z0 is None or not normalize else z0.to(dt).contiguous()
        if k is q and torch.compiler.is_compiling():  # Dynamo refuses one tensor as two inputs (ABC's unit features)
            k = k.clone()
        chunk = chunk_size or cpp_chunk(q.shape[-1])
        num, den, final, zf = _LinearCppFn.apply(q, k, v, log_decay, h0, z0, normalize, chunk)
        return _finish(num, den, final, zf, normalize, out_dtype)

    @staticmethod
    def run(q, k, v, log_decay, state, chunk_size):
        num, _, final, _ = LinearCpp.run_fused(q, k, v, log_decay, state, None, False, None, chunk_size)
        return num, final


class LinearChunked(ChunkedBackend):
    op = "linear_attention"

    @staticmethod
    def run_fused(q, k, v, log_decay, h0, z0, normalize, out_dtype, chunk_size):
        """``(out, H_final, z_final or None)``, normalised (or not) without a ones column of ``v``."""
        chunk_size = chunk_size or DEFAULT_CHUNK
        num, den, final, zf = chunked_linear_attention(q, k, v, log_decay, h0, chunk_size, z0, normalize)
        return _finish(num, den, final, zf, normalize, out_dtype)

    @staticmethod
    def run(q, k, v, log_decay, state, chunk_size):
        num, _, final, _ = chunked_linear_attention(q, k, v, log_decay, state, chunk_size or DEFAULT_CHUNK)
        return num, final


class LinearReference(ReferenceBackend):
    op = "linear_attention"
    description = "quadratic masked PyTorch form (for tests; float64-friendly)"

    @staticmethod
    def run(q, k, v, log_decay, state, chunk_size):
        init = None if state is None else (state, state.new_zeros(state.shape[:-1]))
        o, _, final, _ = reference_linear_attention(q, k, v, log_decay, init, True)
        return o, final


LINEAR_ATTENTION = Dispatcher("linear_attention", (LinearTriton, LinearCpp, LinearChunked, LinearReference))


# ------------------------------------------------------------------------------------ public entry
def _check(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, log_decay, key_padding_mask, initial_state, normalize
) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise TypeError(
                f"{name} must be a 4-D floating tensor (B, H, L, dim), got "
                f"{type(x).__name__ if not isinstance(x, Tensor) else (x.dtype, tuple(x.shape))}"
            )
    bsz, heads, seq, m = k.shape
    if q.shape[:2] != (bsz, heads) or q.shape[-1] != m:
        raise ValueError(f"q {tuple(q.shape)} must be (B, H, T, m) with k's B, H, m {(bsz, heads, m)}")
    if v.shape[:3] != (bsz, heads, seq):
        raise ValueError(f"v {tuple(v.shape)} must be (B, H, S, d) with k's B, H, S {(bsz, heads, seq)}")
    if causal and q.shape[2] > seq:
        raise ValueError(
            f"causal linear attention needs T <= S (queries are the last T keys), got {q.shape[2]} > {seq}"
        )
    if log_decay is not None:
        if not causal:
            raise ValueError("log_decay only applies to causal linear attention")
        if log_decay.shape != (bsz, heads, seq):
            raise ValueError(f"log_decay must have shape (B, H, S) = {(bsz, heads, seq)}, got {tuple(log_decay.shape)}")
        if log_decay.requires_grad:
            raise ValueError("log_decay is a constant of the op (no gradient flows into it): pass it detached")
    if key_padding_mask is not None and key_padding_mask.shape != (bsz, seq):
        raise ValueError(f"key_padding_mask must have shape (B, S) = {(bsz, seq)}, got {tuple(key_padding_mask.shape)}")
    if initial_state is not None:
        if len(initial_state) != 2:
            raise ValueError("initial_state must be a pair (H (B, H, m, d), z (B, H, m))")
        h0, z0 = initial_state
        if z0 is None and normalize:
            raise ValueError("initial_state needs its normaliser z when normalize=True")
        if h0.shape != (bsz, heads, m, v.shape[-1]) or (z0 is not None and z0.shape != (bsz, heads, m)):
            raise ValueError(
                f"initial_state shapes {tuple(h0.shape)}, {tuple(z0.shape)} must be "
                f"{(bsz, heads, m, v.shape[-1])} and {(bsz, heads, m)}"
            )


@overload
def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    log_decay: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    normalize: bool = True,
    initial_state: Optional[State] = None,
    return_state: Literal[False] = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor: ...


@overload
def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    log_decay: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    normalize: bool = True,
    initial_state: Optional[State] = None,
    return_state: Literal[True],
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, State]: ...


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    log_decay: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    normalize: bool = True,
    initial_state: Optional[State] = None,
    return_state: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[Tensor, Tuple[Tensor, State]]:
    """Linear attention ``q (B,H,T,m)``, ``k (B,H,S,m)``, ``v (B,H,S,d)`` -> ``(B,H,T,d)`` (see the module doc).

    ``key_padding_mask`` ``(B, S)`` (True = padding) removes keys.  The result is fp32 (fp64 for fp64
    inputs); with ``return_state`` also the final ``(H (B,H,m,d), z (B,H,m))``.  ``chunk_size`` tunes the
    ``"cpp"`` and ``"chunked"`` backends (None: :func:`cpp_chunk`, :data:`DEFAULT_CHUNK`); ``backend`` forces one
    of ``"triton"``, ``"cpp"``, ``"chunked"``, ``"reference"`` for the causal
    case (``BackendUnavailableError``, a ``ValueError``, listing every reason when it cannot run); the noncausal
    form is two matmuls on any backend.
    ``out_dtype`` casts the result (not the state); a normalised result is written in it directly, in a
    time-first ``(T, B, H, d)`` memory layout, so merging the heads afterwards needs no copy.
    """
    _check(q, k, v, causal, log_decay, key_padding_mask, initial_state, normalize)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
    if backend is not None:
        LINEAR_ATTENTION.backend(backend)  # a ValueError naming the choices
    with torch.autocast(q.device.type, enabled=False):  # the PyTorch paths accumulate in fp32 under autocast too
        return _linear_attention(
            q,
            k,
            v,
            causal,
            log_decay,
            key_padding_mask,
            normalize,
            initial_state,
            return_state,
            chunk_size,
            backend,
            out_dtype,
        )


def _linear_attention(
    q, k, v, causal, log_decay, key_padding_mask, normalize, initial_state, return_state, chunk_size, backend, out_dtype
):
    dt = _acc(q.dtype)
    tgt_len, src_len, d = q.shape[2], k.shape[2], v.shape[-1]
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask.to(device=k.device, dtype=torch.bool)[:, None, :, None], 0.0)
    if causal and src_len > 0:
        if tgt_len < src_len:  # the first S - T keys have no query of their own
            q = torch.nn.functional.pad(q, (0, 0, src_len - tgt_len, 0))
        impl = LINEAR_ATTENTION.select(backend, q, k, v)
        if impl is LinearTriton:  # the normaliser in-kernel: no ones column, the result written in out_dtype
            h0 = None if initial_state is None else initial_state[0]
            z0 = None if initial_state is None else initial_state[1]
            time_first = normalize or out_dtype is not None  # as :class:`_Normalize` writes it
            out, final, zf = LinearTriton.run_fused(q, k, v, log_decay, h0, z0, normalize, out_dtype or dt, time_first)
            out = out[:, :, src_len - tgt_len :] if tgt_len < src_len else out
            return (out, (final, zf)) if return_state else out
        if impl is LinearCpp or impl is LinearChunked:  # the normaliser beside the state, no ones column either
            h0 = None if initial_state is None else initial_state[0]
            z0 = None if initial_state is None else initial_state[1]
            out, final, zf = impl.run_fused(q, k, v, log_decay, h0, z0, normalize, out_dtype, chunk_size)
            out = out[:, :, src_len - tgt_len :] if tgt_len < src_len else out
            return (out, (final, zf)) if return_state else out
    with_den = normalize
    if with_den:  # the denominator rides along as a ones column of v (and z as the last column of the state)
        v = torch.nn.functional.pad(v, (0, 1), value=1.0)
    state = None
    if initial_state is not None:
        state = initial_state[0].to(dt)
        if with_den:
            state = torch.cat([state, initial_state[1].to(dt).unsqueeze(-1)], dim=-1)
    if not causal:
        kv = _sum_products(k.to(dt).transpose(-1, -2), v.to(dt))
        final = kv if state is None else kv + state
        o = _broadcast_product(q.to(dt), final)
    elif src_len == 0:
        final = q.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1], dtype=dt) if state is None else state
        o = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=dt)
    else:
        o, final = impl.run(q, k, v, log_decay, state, chunk_size)
        if tgt_len < src_len:
            o = o[:, :, src_len - tgt_len :]
    out = _Normalize.apply(o, out_dtype or o.dtype) if normalize else o if out_dtype is None else o.to(out_dtype)
    if not return_state:
        return out
    return out, ((final[..., :d], final[..., d]) if with_den else (final, None))
