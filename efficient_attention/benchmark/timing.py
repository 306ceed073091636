"""The timing harness shared by every benchmark: torch only, no import of this package.

It is kept free of ``efficient_attention`` imports on purpose:
``benchmarks/mechanisms_gpu.py`` loads this file by path in a separate process
to time the CAB library, whose package is also called ``efficient_attention``,
so our mechanisms and CAB's are measured by the same code.

* :func:`run_timed` -- ``warmup`` untimed calls, then ``repeats`` timed calls
  (CUDA events on the current stream on a GPU, ``time.perf_counter`` on the
  CPU), each preceded by an unmeasured ``reset()``; the median is reported.
  If two timed calls both take longer than ``budget`` seconds no more are made.
* :func:`peak_bytes` -- the peak memory of one more call: on CUDA
  ``max_memory_allocated`` after ``reset_peak_memory_stats`` (absolute, and on
  top of what was live before the call); on the CPU only the extra bytes, from
  the caller's ``cpu_peak`` function (the profiler, see ``measure.py``).
* :func:`train_case` -- CAB's efficiency step: a fairseq-style attention module
  called as ``module(x, x, x, need_weights=False)`` on ``x`` of shape
  ``(L, B, E)`` in fp32 under autocast, ``loss = out.sum()``, backward;
  gradients reset to ``None`` outside the measured region.
* :func:`clone_state` -- a deep copy of an incremental decoding state, so a
  decoding step can be timed again and again at the same context length.
* :func:`classify_exception` -- ``("oom", text)`` or ``("error", text)``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Optional, Tuple

import torch

__all__ = ["DTYPES", "sync", "time_call", "run_timed", "peak_bytes", "train_case", "clone_state", "classify_exception"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes (CUDA events on a GPU, ``perf_counter`` on the CPU)."""
    if device.type == "cuda":
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_timed(
    call: Callable[[], object],
    reset: Callable[[], None],
    device: torch.device,
    warmup: int,
    repeats: int,
    budget: float = float("inf"),
) -> dict:
    """``time_s`` (median), ``times_s`` (every timed call), ``repeats``, ``warmup_s`` (every warm-up call)."""
    warm = []
    for _ in range(max(0, warmup)):  # untimed: the first calls carry one-time costs (compilation, plans)
        reset()
        t0 = time.perf_counter()
        call()
        sync(device)
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(max(1, repeats)):
        reset()
        times.append(time_call(call, device))
        if len(times) >= 2 and min(times) > budget:
            break  # slow: measured twice is enough
    return {"time_s": statistics.median(times), "times_s": times, "repeats": len(times), "warmup_s": warm}


def peak_bytes(
    call: Callable[[], object],
    reset: Callable[[], None],
    device: torch.device,
    cpu_peak: Optional[Callable[[Callable[[], object]], int]] = None,
) -> dict:
    """``mem_peak_bytes`` (extra over what was live before the call) and, on CUDA, ``mem_max_allocated_bytes``."""
    reset()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"mem_peak_bytes": int(peak - before), "mem_max_allocated_bytes": int(peak)}
    if cpu_peak is None:
        return {}
    return {"mem_peak_bytes": int(cpu_peak(call))}


def train_case(
    module: torch.nn.Module,
    length: int,
    batch: int,
    embed_dim: int,
    device: torch.device,
    autocast: Optional[torch.dtype],
    seed: int = 0,
) -> Tuple[Callable[[], None], Callable[[], None]]:
    """``(call, reset)`` of one training step: forward under autocast, ``out.sum()``, backward (train mode)."""
    module.train()
    g = torch.Generator(device=device).manual_seed(seed + length)
    x = torch.randn(length, batch, embed_dim, generator=g, device=device)
    x.requires_grad_(True)
    leaves = [p for p in module.parameters() if p.requires_grad] + [x]
    use_autocast = autocast is not None and x.dtype != autocast

    def reset() -> None:
        for t in leaves:
            t.grad = None

    def call() -> None:
        with torch.autocast(device.type, dtype=autocast) if use_autocast else contextlib.nullcontext():
            out = module(x, x, x, need_weights=False)[0]
        out.float().sum().backward()

    return call, reset


def clone_state(state):
    """A deep copy of a decoding state: tensors cloned, dicts / lists / tuples rebuilt, anything else shared."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return type(state)((k, clone_state(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(v) for v in state)
    return state


def classify_exception(exc: BaseException) -> Tuple[str, str]:
    """``("oom", text)`` for out-of-memory errors (CUDA or CPU), else ``("error", text)``."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), MemoryError) if t is not None)
    if isinstance(exc, oom_types):
        return "oom", text
    msg = str(exc).lower()
    if isinstance(exc, RuntimeError) and any(
        s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator")
    ):
        return "oom", text
    return "error", text
