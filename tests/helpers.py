"""Shared test helpers: building mechanisms for a pattern, inputs, decoding loops."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
from references import get_reference

from efficient_attention import Pattern, available_attentions, build_attention
from efficient_attention.kernels._loader import cpu_extension, cpu_extension_reason

# Why tests of the C++ kernels' own behaviour (their backend chosen, their op counts) skip: None where they are
# built.  (CI builds them, and test_kernels_cpu.py fails there when they are not; elsewhere, e.g. a GPU machine
# without a compiler, those tests skip and every other test runs on the reference path.)
NO_CPP: Optional[str] = (
    None if cpu_extension() is not None else f"the C++ kernels are not built: {cpu_extension_reason()}"
)

# The device the registry-wide tests (test_generic.py) build modules and inputs on.  ``EA_TEST_DEVICE=cuda`` runs
# them through the GPU paths: the Triton kernels wherever the dtype allows (float32 / half; float64 takes the
# reference paths on any device), SDPA's CUDA backends, the CUDA-only branches.
DEVICE = torch.device(os.environ.get("EA_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("EA_TEST_DEVICE=cuda, but torch.cuda.is_available() is False")

EMBED_DIM = 16
NUM_HEADS = 4
BSZ = 3

# per-dtype tolerances for comparisons against a float64 computation
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def mechanism_patterns(predicate=lambda caps, pattern: True) -> List[Tuple[str, Pattern]]:
    """(name, pattern) for every registered mechanism and supported pattern passing ``predicate``."""
    return [
        (name, p)
        for name, info in available_attentions().items()
        for p in Pattern
        if info.capabilities.supports(p) and predicate(info.capabilities, p)
    ]


def case_id(val) -> str:
    return str(val).replace(" ", "-") if isinstance(val, Pattern) else str(val)


def build(name: str, pattern: Pattern, dtype=torch.float64, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    opts = dict(get_reference(name).options)
    opts.update(overrides)
    m = build_attention(
        name, embed_dim=EMBED_DIM, num_heads=NUM_HEADS, cross=pattern.cross, causal=pattern.causal, **opts
    )
    return m.to(device=DEVICE, dtype=dtype).eval()


def lengths(name: str, pattern: Pattern) -> Tuple[int, int]:
    ref = get_reference(name)
    tgt = ref.tgt_len
    src = ref.src_len if pattern is Pattern.NONCAUSAL_CROSS else tgt
    return tgt, src


def inputs(name: str, pattern: Pattern, dtype=torch.float64, bsz: int = BSZ, seed: int = 1):
    """(query, key, value) time-first; key/value are the query for self patterns."""
    tgt, src = lengths(name, pattern)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tgt, bsz, EMBED_DIM, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    if not pattern.cross:
        return q, q, q
    k = torch.randn(src, bsz, EMBED_DIM, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    v = torch.randn(src, bsz, EMBED_DIM, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return q, k, v


def padding_mask(bsz: int, length: int, pattern: Pattern, n_pad: int = 3) -> torch.Tensor:
    """Bool (B, S): batch 1 right-padded (causal) or left-padded (noncausal) by ``n_pad``; batch 2 by 1."""
    mask = torch.zeros(bsz, length, dtype=torch.bool, device=DEVICE)
    if pattern.causal:
        mask[1, length - n_pad :] = True
        mask[bsz - 1, length - 1 :] = True
    else:
        mask[1, :n_pad] = True
        mask[bsz - 1, :1] = True
    return mask


def decode(
    m,
    query,
    key=None,
    value=None,
    *,
    prefix: int = 0,
    state: Optional[Dict] = None,
    static_kv=False,
    key_padding_mask=None,
):
    """Run ``m`` step by step (after an optional ``prefix``-long first chunk); returns (T, B, C)."""
    state = {} if state is None else state
    outs = []
    t, tgt_len = 0, query.shape[0]
    while t < tgt_len:
        n = prefix if (t == 0 and prefix) else 1
        sl = slice(t, t + n)
        if static_kv:
            k = key if t == 0 else None
            out, _ = m(
                query[sl],
                k,
                k if k is None else value,
                incremental_state=state,
                static_kv=True,
                need_weights=False,
                key_padding_mask=key_padding_mask if t == 0 else None,
            )
        else:
            kk = query[sl] if key is None else key[sl]
            vv = query[sl] if value is None else value[sl]
            kpm = None if key_padding_mask is None else key_padding_mask[:, sl]
            out, _ = m(query[sl], kk, vv, incremental_state=state, need_weights=False, key_padding_mask=kpm)
        outs.append(out)
        t += n
    return torch.cat(outs, dim=0), state


def assert_close(actual, expected, dtype=torch.float64, msg=""):
    torch.testing.assert_close(actual.to(expected.dtype), expected, **TOL[dtype], msg=lambda m: f"{msg}\n{m}")
