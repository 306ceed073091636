"""Landmark attention block by block: O(N) memory forward and backward.

:func:`landmark_attention` computes the grouped softmax of
:func:`efficient_attention.sparse.landmark.landmark_attention` for the fixed-period landmark layout
(position ``j`` is a landmark iff ``j % block_size == block_size - 1``) without ever holding a
``T x S`` tensor.  A query at position ``p`` in block ``c`` attends its own block causally (the
landmark of block ``c`` only to itself) and each earlier block ``b`` as one softmax item with logit
``s(L_b)`` and value ``A_b`` = the block's own softmax average of its tokens' values, so the output
is a FlashAttention-style online softmax over those items:

    out = (sum_{own j} e^{s_j} v_j + sum_{b < c} e^{s(L_b)} A_b) / Z,   lse = log Z.

Backends (``LANDMARK``, a :class:`~efficient_attention.kernels.dispatch.Dispatcher`; its
``not_supported_reasons`` says why one cannot run):

* ``"triton"``    -- the fused GPU kernels of ``_triton_landmark.py`` (fp16/bf16/fp32, fp32 accumulation);
* ``"cpp"``       -- the C++ CPU kernels (``csrc/cpu/landmark_attention.cpp``, registered ops
  ``efficient_attention::landmark_fwd`` / ``_bwd``): an online softmax over the items of a query block, one earlier
  key block at a time, the backward one task per (batch, head) recomputing the weights from ``lse``
  (fp32 / fp64; half inputs computed in fp32);
* ``"reference"`` (formerly ``"torch"``, still accepted) -- the same computation in PyTorch, a chunk of
  query blocks at a time with batched matmuls against only the keys the chunk can see, and a
  hand-written backward that recomputes each chunk (any device and float dtype; float64 for gradcheck).
  Scores are scaled and formed in at least fp32 (fp16 inputs of large magnitude stay finite).

All run under one ``autograd.Function`` (``_LandmarkFn``); the Triton kernels are also registered as
custom ops (``torch.ops.efficient_attention.triton_landmark``, ``triton_landmark_bwd``) for ``torch.compile``.
The general formula (any ``is_mem``, ``top_k`` retrieval) stays in ``sparse/landmark.py``; it is
the float64 reference these paths are tested against.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..functional import acc_dtype, repeat_kv
from .backends import CppBackend, ReferenceBackend, TritonBackend, kernel_shape_reasons, tile_head_dim_reasons
from .dispatch import Dispatcher

__all__ = ["landmark_attention", "landmark_blocks_torch", "LANDMARK", "LANDMARK_BLOCK_SIZES", "LANDMARK_FP32_TILE"]

_CHUNK_ELEMS = 1 << 22  # scores held at once by the torch path (per chunk: B*H*rows*keys)


# -- the PyTorch path -------------------------------------------------------------------------------
def _chunk_weights(qc: Tensor, k: Tensor, pos: Tensor, bs: int, valid: Tensor):
    """Weights of a chunk of queries over the first ``k.shape[2]`` keys (a multiple of ``bs``).

    qc: ``(B, H, C, d)`` already scaled, acc dtype; pos: ``(C,)`` absolute positions; valid: ``(B|1, Sk)``
    keys that exist and are not padding.  Returns ``W (B, H, C, Sk)`` (the attention weights),
    ``lse (B, H, C)``, the inner softmax ``a (B, H, C, nb, bs)`` and gate probabilities ``P (B, H, C, nb)``.
    """
    sk = k.shape[2]
    nb = sk // bs
    s = torch.matmul(qc, k.transpose(-1, -2))  # (B, H, C, Sk)
    j = torch.arange(sk, device=qc.device)
    kb, is_mark = j // bs, (j % bs) == bs - 1
    c = (pos // bs)[:, None]
    ok = valid[:, None, None, :]  # (B|1, 1, 1, Sk)
    own = ok & (kb == c) & (j <= pos[:, None]) & (~is_mark | (j == pos[:, None]))
    tok = (ok & (kb < c) & ~is_mark).view(*ok.shape[:2], len(pos), nb, bs)
    gate = (ok & (kb < c) & is_mark).view(*ok.shape[:2], len(pos), nb, bs)[..., -1]
    sb = s.view(*s.shape[:3], nb, bs)
    st = sb.masked_fill(~tok, float("-inf"))
    mb = st.amax(-1, keepdim=True)
    e = torch.exp(st - mb.masked_fill(torch.isinf(mb), 0.0))
    a = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    t = sb[..., -1]
    items = torch.cat([s.masked_fill(~own, float("-inf")), t.masked_fill(~gate, float("-inf"))], -1)
    lse = torch.logsumexp(items, -1)
    lse_s = lse.masked_fill(torch.isinf(lse), 0.0)[..., None]
    w_own = torch.where(own, torch.exp(s - lse_s), 0.0)
    P = torch.where(gate, torch.exp(t - lse_s), 0.0)
    W = w_own + (P[..., None] * a).flatten(-2)
    return W, lse, a, P, w_own


def _chunks(tgt_len: int, src_len: int, bs: int, q_offset: int, work: int):
    """Query chunks ``(start, end, keys)``: whole blocks of positions, ``keys`` = the keys they can see."""
    rows = max(bs, (_CHUNK_ELEMS // max(1, work * src_len)) // bs * bs)
    t = 0
    while t < tgt_len:
        first_blk = (t + q_offset) // bs
        end = min(tgt_len, (first_blk * bs + rows) - q_offset)
        keys = ((end - 1 + q_offset) // bs + 1) * bs
        yield t, end, keys
        t = end


def _prepare_torch(q, k, v, kpm, bs):
    """Upcast to the accumulation dtype, pad keys to whole blocks; ``valid (B|1, Sp)``."""
    dt = acc_dtype(q.dtype)
    src_len = k.shape[2]
    sp = -(-src_len // bs) * bs
    kk, vv = k.to(dt), v.to(dt)
    if sp != src_len:
        kk = torch.nn.functional.pad(kk, (0, 0, 0, sp - src_len))
        vv = torch.nn.functional.pad(vv, (0, 0, 0, sp - src_len))
    valid = torch.arange(sp, device=q.device)[None] < src_len
    if kpm is not None:
        valid = valid & ~torch.nn.functional.pad(kpm, (0, sp - src_len), value=True)
    return kk, vv, valid, dt


def _torch_forward(q, k, v, kpm, bs, scale):
    bsz, heads, tgt_len, _ = q.shape
    src_len = k.shape[2]
    kk, vv, valid, dt = _prepare_torch(q, k, v, kpm, bs)
    off = src_len - tgt_len
    out = q.new_empty(q.shape[:3] + (v.shape[-1],))
    lse = q.new_empty(q.shape[:3], dtype=dt)
    for t0, t1, sk in _chunks(tgt_len, src_len, bs, off, bsz * heads):
        pos = torch.arange(t0, t1, device=q.device) + off
        W, lse_c, *_ = _chunk_weights(q[:, :, t0:t1].to(dt) * scale, kk[:, :, :sk], pos, bs, valid[:, :sk])
        out[:, :, t0:t1] = torch.matmul(W, vv[:, :, :sk]).to(out.dtype)
        lse[:, :, t0:t1] = lse_c
    return out, lse.float() if dt != torch.float64 else lse


def _torch_backward(do, dlse, q, k, v, out, kpm, bs, scale):
    bsz, heads, tgt_len, _ = q.shape
    src_len = k.shape[2]
    kk, vv, valid, dt = _prepare_torch(q, k, v, kpm, bs)
    off = src_len - tgt_len
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(kk), torch.zeros_like(vv)
    for t0, t1, sk in _chunks(tgt_len, src_len, bs, off, bsz * heads):
        pos = torch.arange(t0, t1, device=q.device) + off
        qc, doc = q[:, :, t0:t1].to(dt) * scale, do[:, :, t0:t1].to(dt)
        W, _, a, P, w_own = _chunk_weights(qc, kk[:, :, :sk], pos, bs, valid[:, :sk])
        delta = (doc * out[:, :, t0:t1].to(dt)).sum(-1)
        if dlse is not None:
            delta = delta - dlse[:, :, t0:t1].to(dt)
        dp = torch.matmul(doc, vv[:, :, :sk].transpose(-1, -2))  # (B, H, C, Sk)
        dpb = dp.view(*dp.shape[:3], -1, bs)
        E = (a * dpb).sum(-1)  # (B, H, C, nb): dO . A_b
        ds_b = P[..., None] * a * (dpb - E[..., None])
        is_mark = torch.arange(bs, device=q.device) == bs - 1
        ds_b = ds_b + torch.where(is_mark, (P * (E - delta[..., None]))[..., None], 0.0)
        ds = w_own * (dp - delta[..., None]) + ds_b.flatten(-2)
        dq[:, :, t0:t1] = (torch.matmul(ds, kk[:, :, :sk]) * scale).to(dq.dtype)
        dk[:, :, :sk] += torch.matmul(ds.transpose(-1, -2), qc)
        dv[:, :, :sk] += torch.matmul(W.transpose(-1, -2), doc)
    return dq, dk[:, :, :src_len].to(k.dtype), dv[:, :, :src_len].to(v.dtype)


def landmark_blocks_torch(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float, key_padding_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """The PyTorch path (k, v with q's head count; ``key_padding_mask`` bool ``(B, S)`` or None)."""
    return _LandmarkFn.apply("reference", q, k, v, key_padding_mask, block_size, scale)


# -- the Triton path ----------------------------------------------------------------------------------
# Tuning: ``EA_LANDMARK_CONFIG`` (JSON, e.g. ``{"dkdv": {"num_stages": 2}}``) or ``CONFIG_OVERRIDE`` (the same
# dict, set at run time) replaces entries of ``landmark_config``'s result per kernel (fwd, dq, dkdv); results do not
# depend on it beyond rounding.  benchmarks/sparse_gpu.py sweeps candidates through it.
CONFIG_OVERRIDE: Dict[str, dict] = json.loads(os.environ.get("EA_LANDMARK_CONFIG", "{}") or "{}")


def landmark_config(block_size: int, head_dim: int, dtype: torch.dtype) -> Dict[str, dict]:
    """Launch parameters of the three kernels: the query tile ``BLOCK_M`` (the key tile is one landmark block),
    warps, pipeline stages, and the kernels' layout switches ``GATE_DOT`` / ``KEYS_FIRST`` (see
    ``_triton_landmark``); ``benchmarks/landmark_gpu.py`` times the alternatives.  Cached; callers must not
    mutate the dicts."""
    cfg = _landmark_config(block_size, head_dim, dtype)
    if CONFIG_OVERRIDE:
        cfg = {k: dict(c, **CONFIG_OVERRIDE.get(k, {})) for k, c in cfg.items()}
    return cfg


@functools.lru_cache(maxsize=None)
def _landmark_config(block_size: int, head_dim: int, dtype: torch.dtype) -> Dict[str, dict]:
    wide = dtype == torch.float32 and block_size * head_dim > 64 * 64  # fp32 tiles of 8192: spread over 8 warps
    stages = 1 if wide else 3
    small = block_size <= 64 and head_dim <= 64 and dtype != torch.float32
    long_rows = dict(BLOCK_M=128, num_warps=8, num_stages=stages, GATE_DOT=False)
    short_rows = dict(BLOCK_M=64, num_warps=8 if wide else 4, num_stages=stages, GATE_DOT=False)
    # H200, bf16, d 64, block 64 (benchmarks/landmark_tune_gpu.py, landmark_gpu.py): forward 4 warps on 128 rows
    # (0.94 vs 1.10 ms at 8k); dq 64 rows on 4 warps (backward 2.86 vs 3.03 ms at 8k, 43.1 vs 46.7 at 32k with
    # 128 rows on 8); dk/dv 64 query rows on 4 warps, queries first (3.03 vs 5.40 keys first, 3.36 with 128 rows).
    # Half inputs: dq added by the dk/dv kernel with atomics (kernels fwd+bwd 4.40 -> 4.02 ms at 8k, 56.1 -> 51.3 at
    # 32k, session 4's sparse_gpu.py sweep; results within 1.2e-4 of the two-pass dq, one fp32 (B, H, T, d) buffer)
    return dict(
        fwd=dict(long_rows, num_warps=4) if small else short_rows,
        dq=short_rows,
        dkdv=dict(
            short_rows, BLOCK_M=128 if block_size < 64 else 64, KEYS_FIRST=False, FUSED_DQ=dtype != torch.float32
        ),
    )


def _dense(x: Tensor) -> bool:
    """Whether ``x`` is a permutation of a contiguous tensor with unit stride along its last dim (the kernels
    read any such layout, and outputs allocated with its strides cover the same memory)."""
    if x.stride(-1) != 1:
        return False
    expected = 1
    for i in sorted(range(x.dim()), key=x.stride):
        if x.shape[i] != 1 and x.stride(i) != expected:
            return False
        expected *= x.shape[i]
    return True


def _rows(x: Tensor) -> Tensor:
    """``x`` itself if the kernels can read it in place (dense, and row offsets ``n * stride(2)`` that fit the
    kernels' int32 arithmetic), else a contiguous copy."""
    return x if _dense(x) and x.shape[2] * x.stride(2) < 2**31 else x.contiguous()


def _like(x: Tensor) -> Tensor:
    """An uninitialised tensor with ``x``'s shape, dtype and strides (``x`` dense: see ``_dense``)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _strides(x: Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _kpm_arg(kpm: Optional[Tensor], q: Tensor) -> Tuple[Tensor, bool]:
    if kpm is None:
        return q, False  # never read (HAS_KPM=False): any pointer does, no allocation
    return kpm.to(torch.uint8).contiguous(), True


def _triton_forward(q, k, v, kpm, bs, scale):
    from . import _triton_landmark as tl_
    from ._triton_common import launch

    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, T, D = q.shape
    S = k.shape[2]
    out = _like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    kpm_t, has_kpm = _kpm_arg(kpm, q)
    cfg = landmark_config(bs, D, q.dtype)["fwd"]
    grid = (-(-T // cfg["BLOCK_M"]), B * H)
    launch(
        tl_._landmark_fwd_kernel,
        grid,
        (q, k, v, kpm_t, out, lse),
        (scale * tl_.LOG2E, H, T, S, S - T, *_strides(q), *_strides(k), *_strides(v)),
        dict(HAS_KPM=has_kpm, IEEE=q.dtype == torch.float32, BS=bs, HEAD_DIM=D, **cfg),
    )
    return out, lse


def _triton_backward(do, dlse, q, k, v, out, lse, kpm, bs, scale):
    from . import _triton_landmark as tl_
    from ._triton_common import launch

    q, k, v, do = _rows(q), _rows(k), _rows(v), _rows(do)
    if out.stride() != q.stride():
        out = _like(q).copy_(out)  # the kernels read out with q's strides (it was allocated so)
    lse = lse.contiguous()
    B, H, T, D = q.shape
    S = k.shape[2]
    has_dlse = dlse is not None
    dlse = dlse.contiguous() if has_dlse else lse
    delta = torch.empty_like(lse)
    kpm_t, has_kpm = _kpm_arg(kpm, q)
    dq, dk, dv = _like(q), _like(k), _like(v)
    cfgs = landmark_config(bs, D, q.dtype)
    flags = dict(HAS_KPM=has_kpm, IEEE=q.dtype == torch.float32, BS=bs, HEAD_DIM=D)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    c = cfgs["dq"]
    fused = cfgs["dkdv"]["FUSED_DQ"]
    # FUSED_DQ: the dq kernel only writes delta; the dk/dv kernel adds dq into an fp32 buffer (atomics)
    dq32 = torch.zeros(B, H, T, D, device=q.device, dtype=torch.float32) if fused else dq
    launch(
        tl_._landmark_dq_kernel,
        (-(-T // c["BLOCK_M"]), B * H),
        (q, k, v, kpm_t, do, out, dlse, lse, delta, dq),
        (scale * tl_.LOG2E, scale, H, T, S, S - T, *strides),
        dict(HAS_DLSE=has_dlse, DELTA_ONLY=fused, **flags, **c),
    )
    launch(
        tl_._landmark_dkdv_kernel,
        (-(-S // bs), B * H),
        (q, k, v, kpm_t, do, lse, delta, dk, dv, dq32),
        (scale * tl_.LOG2E, scale, H, T, S, S - T, *strides),
        dict(flags, **cfgs["dkdv"]),
    )
    if fused:
        dq.copy_(dq32)
    return dq, dk, dv


@torch.library.custom_op("efficient_attention::triton_landmark", mutates_args=())
def triton_landmark(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], block_size: int, scale: float
) -> Tuple[Tensor, Tensor]:
    """``(out (B, H, T, d), lse (B, H, T) fp32)`` of CUDA ``(B, H, N, d)`` tensors (k, v with q's heads)."""
    return _triton_forward(q, k, v, key_padding_mask, block_size, scale)


@triton_landmark.register_fake
def _(q, k, v, key_padding_mask, block_size, scale):
    return _like(_rows(q)), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("efficient_attention::triton_landmark_bwd", mutates_args=())
def triton_landmark_bwd(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Optional[Tensor],
    block_size: int,
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _triton_backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, block_size, scale)


@triton_landmark_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, block_size, scale):
    return _like(_rows(q)), _like(_rows(k)), _like(_rows(v))


# -- the one autograd wiring of both backends ------------------------------------------------------------------
def _landmark_ops(backend: str):
    """``(forward, backward)`` of a backend: the registered ops while compiling, else the launches themselves."""
    if backend == "cpp":
        return torch.ops.efficient_attention.landmark_fwd, torch.ops.efficient_attention.landmark_bwd
    if backend != "triton":
        return _torch_forward, _torch_backward
    if torch.compiler.is_compiling():
        return torch.ops.efficient_attention.triton_landmark, torch.ops.efficient_attention.triton_landmark_bwd
    return _triton_forward, _triton_backward


class _LandmarkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, q, k, v, kpm, bs, scale):
        if backend == "triton":
            q, k, v = _rows(q), _rows(k), _rows(v)  # saved as the kernels read them (head views need no copy)
        fwd, _ = _landmark_ops(backend)
        out, lse = fwd(q, k, v, kpm, bs, scale)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.backend, ctx.bs, ctx.scale = backend, bs, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        _, bwd = _landmark_ops(ctx.backend)
        if ctx.backend != "reference":  # the kernels read the forward's log-sum-exp
            dq, dk, dv = bwd(grad_out, grad_lse, q, k, v, out, lse, kpm, ctx.bs, ctx.scale)
        else:
            dq, dk, dv = bwd(grad_out, grad_lse, q, k, v, out, kpm, ctx.bs, ctx.scale)
        return None, dq, dk, dv, None, None, None


# -- backends ---------------------------------------------------------------------------------------------------
LANDMARK_BLOCK_SIZES = (16, 32, 64, 128)
LANDMARK_FP32_TILE = 64 * 128  # largest fp32 key tile (block_size * head_dim) of the landmark kernels


_env: dict = {}


@torch.compiler.assume_constant_result
def _landmark_triton_reason() -> Optional[str]:
    if "triton" not in _env:
        why = TritonBackend.environment_reason()
        if why is None:
            try:
                from . import _triton_landmark  # noqa: F401
            except Exception as exc:  # a broken Triton install must not break the library
                why = f"the Triton landmark kernels failed to import ({type(exc).__name__}: {exc})"
        _env["triton"] = why
    return _env["triton"]


class LandmarkTriton(TritonBackend):
    op = "landmark"

    @classmethod
    def environment_reason(cls) -> Optional[str]:
        return _landmark_triton_reason()

    @classmethod
    def input_reasons(  # type: ignore[override]  # each op's backends take that op's keyword params, not any
        cls, q: Tensor, k: Tensor, v: Tensor, block_size: Optional[int] = None
    ) -> List[str]:
        reasons = kernel_shape_reasons(q, k, v) + tile_head_dim_reasons(q, v)
        if block_size not in LANDMARK_BLOCK_SIZES:
            reasons.append(
                f"block_size {block_size} is not one of {LANDMARK_BLOCK_SIZES} (a landmark block is one key tile)"
            )
        elif q.dtype == torch.float32 and block_size * q.shape[-1] > LANDMARK_FP32_TILE:
            reasons.append(
                f"fp32 key tiles of {block_size} keys x {q.shape[-1]} dims do not fit the registers "
                f"(fp32 needs block_size * head_dim <= {LANDMARK_FP32_TILE})"
            )
        return reasons


class LandmarkCpp(CppBackend):
    op = "landmark"

    @classmethod
    def input_reasons(  # type: ignore[override]  # each op's backends take that op's keyword params, not any
        cls, q: Tensor, k: Tensor, v: Tensor, block_size: Optional[int] = None
    ) -> List[str]:
        return kernel_shape_reasons(q, k, v)


class LandmarkReference(ReferenceBackend):
    op = "landmark"
    description = "PyTorch, a chunk of query blocks at a time (any device and float dtype)"


LANDMARK = Dispatcher("landmark", (LandmarkTriton, LandmarkCpp, LandmarkReference), aliases={"torch": "reference"})


# -- the public entry -----------------------------------------------------------------------------------
def landmark_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int = 64,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Landmark attention over the fixed-period layout (every ``block_size``-th position a landmark).

    Args:
        q: ``(B, H, T, d)``, the last ``T`` of the ``S`` positions; k, v: ``(B, Hkv, S, d)``, ``H % Hkv == 0``.
        block_size: landmark period (each block's last position is its landmark).
        scale: logit scale (default ``d ** -0.5``).
        key_padding_mask: ``(B, S)`` bool, True = padding (a padded landmark hides its block).
        backend: ``"triton"``, ``"cpp"`` or ``"reference"`` (``"torch"``) to force one (default: the fastest
            that supports the inputs); a forced backend that cannot run raises ``BackendUnavailableError`` (a
            ``ValueError``) listing every reason.

    Returns:
        ``(out (B, H, T, d), lse (B, H, T))``; rows that see nothing give 0 and ``lse = -inf``.
    """
    if not all(isinstance(x, Tensor) for x in (q, k, v)):
        raise TypeError("q, k, v must be Tensors")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape[:3] + (k.shape[3],) or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q holds {q.shape[2]} positions, more than the {k.shape[2]} keys (queries are the last T)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (B, S) = {(q.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)  # GQA: autograd sums the repeated heads' gradients
    if q.shape[2] == 0:  # nothing to compute (a forced backend's name is still checked)
        if backend is not None:
            LANDMARK.backend(backend)
        return q.new_zeros(q.shape[:3] + (v.shape[-1],)), q.new_zeros(q.shape[:3], dtype=torch.float32)
    impl = LANDMARK.select(backend, q, k, v, block_size=block_size)
    return _LandmarkFn.apply(impl.name, q, k, v, key_padding_mask, block_size, scale)
