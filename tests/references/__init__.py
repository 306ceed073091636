"""Float64 reference implementations, one file per mechanism.

Each file registers, with :func:`reference`, a function that recomputes a
module's output from its parameters with plain, obviously-correct math (loops
and dense matrices are fine), and the options the generic tests build the
mechanism with.  ``tests/test_generic.py`` checks every registered mechanism
against its reference in every pattern it supports, so a new mechanism needs
exactly: the mechanism file, and a reference file here.

A reference function has the signature::

    ref(module, query, key, value, *, key_padding_mask=None, attn_mask=None) -> Tensor

with time-first float64 inputs (``key``/``value`` are the query for self
patterns) and returns the time-first ``(T, B, C)`` output (after ``out_proj``).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch

__all__ = ["reference", "get_reference", "REFERENCES", "project_heads", "merge_and_project"]


@dataclass(frozen=True)
class Reference:
    fn: Callable
    options: Dict = field(default_factory=dict)
    # length the generic tests use for self patterns (mechanisms with blocks may want a multiple)
    tgt_len: int = 11
    src_len: int = 14


REFERENCES: Dict[str, Reference] = {}


def reference(name: str, *, options=None, tgt_len: int = 11, src_len: int = 14):
    def deco(fn):
        REFERENCES[name] = Reference(fn, dict(options or {}), tgt_len, src_len)
        return fn

    return deco


def get_reference(name: str) -> Reference:
    if name not in REFERENCES:
        raise LookupError(f"no float64 reference registered for mechanism {name!r} in tests/references/")
    return REFERENCES[name]


def project_heads(module, query, key, value):
    """Projections split into heads: q ``(B, H, T, d)``, k/v ``(B, Hkv, S, d)`` (float64)."""

    def split(x, heads):
        length, bsz, dim = x.shape
        return x.reshape(length, bsz, heads, dim // heads).permute(1, 2, 0, 3)

    q = split(torch.nn.functional.linear(query, module.q_proj.weight, module.q_proj.bias), module.num_heads)
    k = split(torch.nn.functional.linear(key, module.k_proj.weight, module.k_proj.bias), module.num_kv_heads)
    v = split(torch.nn.functional.linear(value, module.v_proj.weight, module.v_proj.bias), module.num_kv_heads)
    return q, k, v


def merge_and_project(module, out):
    """``(B, H, T, d)`` -> ``out_proj`` of the time-first ``(T, B, C)``."""
    bsz, heads, length, dim = out.shape
    out = out.permute(2, 0, 1, 3).reshape(length, bsz, heads * dim)
    return torch.nn.functional.linear(out, module.out_proj.weight, module.out_proj.bias)


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
