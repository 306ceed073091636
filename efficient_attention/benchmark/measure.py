"""Measuring one benchmark point: one mechanism, pattern, mode, length, dtype and device.

A *point* is a plain dict (JSON-able, so it can cross a process boundary)::

    {"mechanism": "vanilla", "pattern": "causal self", "mode": "forward",
     "length": 1024, "batch": 1, "heads": 8, "dim": 64, "dtype": "float32",
     "device": "cpu", "warmup": 1, "repeats": 5, "budget": 1.0, "seed": 0,
     "options": {}}

``options`` are constructor options of the mechanism (default: its class
defaults).

:func:`measure_point` returns a result dict with ``status`` one of ``ok``,
``oom``, ``error`` (and the exception text in ``detail``).  Nothing here raises
for a failing mechanism: a failure is data.

Modes:

* ``forward``: one inference forward (``eval()``, ``torch.no_grad()``).
* ``backward``: forward + backward of a random output gradient (``train()``,
  dropout is 0); parameter and input gradients are reset to ``None`` between
  calls, outside the measured region.
* ``decode``: one incremental decoding step (one new token) with a context of
  ``length`` tokens already in the state.  Mechanisms using the base class's
  key/value cache get a cache of ``length`` random keys/values written
  directly (the cheap prefill); mechanisms with their own state are prefilled
  by one forward call over ``length`` tokens (token by token if that call
  fails; the prefill has its own time limit, ``10 x budget``, and is not part
  of the point's cost).  Cross patterns decode with ``static_kv=True`` against
  ``length`` encoder states.  The state is copied after the prefill and
  restored before every call (unmeasured), so every warm-up and timed call is
  the same step at the same context length: the kernels (and cuDNN / Triton
  plans, which depend on the shapes) are warm when timing starts, and the
  context does not grow with the repeats.  ``step_growing_s`` is the median
  of eight consecutive steps after one restore, each timed alone, as real
  decoding runs them (the context grows by one each step): much above
  ``time_s`` it shows a shape-dependent cost such as a plan built for every
  new key length.

``autocast`` (optional, e.g. ``"bfloat16"``): the module and inputs are built
in ``dtype`` (fp32 for CAB's efficiency setting) and every call runs under
``torch.autocast`` with this dtype.

Time: ``warmup`` untimed calls, then ``repeats`` timed calls; the median is
reported (all times are kept).  On CUDA each call is timed with CUDA events on
the current stream; on the CPU with ``time.perf_counter``.  If the first two
timed calls both take longer than ``budget`` seconds, no more are made.  The
point's ``cost_s`` (what the sweep's budget looks at) is its fastest timed
call (robust to a hiccup of a busy machine) -- never a warm-up call, which
carries one-time costs, nor a decoding prefill (reported as ``prefill_s``).
The timing and memory code is :mod:`.timing`, shared with the CAB baseline
of ``benchmarks/mechanisms_gpu.py``.

Memory: one more call, measured separately from the timed ones:

* CUDA: ``torch.cuda.reset_peak_memory_stats``; peak =
  ``max_memory_allocated() - memory_allocated()`` taken just before the call.
* CPU: the call runs under ``torch.profiler`` with ``profile_memory=True``; the
  profiler reports every allocation and free made through PyTorch's CPU
  allocator while it runs; their running sum, in time order, is the memory
  the call added on top of what was live before it, and its maximum is the
  peak.  Like ``max_memory_allocated`` on CUDA this counts tensor memory (not
  the allocator's cache, Python objects or libraries' private buffers).

Both report the *extra* memory of the call (activations, workspace, outputs,
gradients; for decoding, the step's new cache and temporaries) -- parameters
and inputs, the same for every mechanism, are excluded and given separately as
``mem_live_bytes``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, Mapping, Optional, Type

import torch
from torch.autograd import DeviceType

from ..base import EfficientAttention
from ..capabilities import Pattern
from ..registry import get_attention_class
from .naive import NAIVE_NAME, NaiveAttention
from .timing import DTYPES, classify_exception, clone_state, peak_bytes, run_timed, sync, time_call

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "measure_point",
    "resolve_mechanism",
    "parse_pattern",
    "pattern_slug",
    "applicable_modes",
    "cpu_peak_bytes",
    "classify_exception",
]

MODES = ("forward", "backward", "decode")


def parse_pattern(text) -> Pattern:
    """``"causal-self"``, ``"causal_self"``, ``"causal self"`` or a :class:`Pattern` -> :class:`Pattern`."""
    if isinstance(text, Pattern):
        return text
    key = str(text).strip().lower().replace("-", " ").replace("_", " ")
    for p in Pattern:
        if p.value == key:
            return p
    raise ValueError(f"unknown pattern {text!r}; use one of: {', '.join(pattern_slug(p) for p in Pattern)}")


def pattern_slug(pattern: Pattern) -> str:
    return pattern.value.replace(" ", "-")


def resolve_mechanism(
    name: str, extra: Optional[Mapping[str, Type[EfficientAttention]]] = None
) -> Type[EfficientAttention]:
    """The class to benchmark: ``naive``, an entry of ``extra``, or a registered mechanism."""
    if extra and name in extra:
        return extra[name]
    if name == NAIVE_NAME:
        return NaiveAttention
    return get_attention_class(name)


def applicable_modes(cls: Type[EfficientAttention], pattern: Pattern):
    """The modes a class can run in a pattern (``decode`` needs incremental decoding,
    and a causal self or a cross pattern)."""
    modes = ["forward", "backward"]
    caps = cls.capabilities
    if caps.incremental and (pattern is Pattern.CAUSAL_SELF or pattern.cross):
        modes.append("decode")
    return modes


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to the null device (C++ code writes there directly, past ``sys.stderr``)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through PyTorch's CPU allocator while ``fn`` runs, on top of what was live before.

    Read from ``torch.profiler``'s memory events: the running sum of
    allocations and frees in time order.  Frees of tensors allocated before
    the call are not reported by the profiler, so they never lower the sum
    (the peak can only be over-, never under-estimated by them).
    """
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced():  # the profiler's C++ side prints a line at every start and stop
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted(
        (
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ),
        key=lambda ev: ev[0],  # stable: events of one timestamp keep their order
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


# ------------------------------------------------------- building a point
def _build(cls, pattern: Pattern, embed_dim: int, heads: int, device, dtype, options: Mapping) -> EfficientAttention:
    module = cls(
        embed_dim,
        heads,
        self_attention=not pattern.cross,
        encoder_decoder_attention=pattern.cross,
        cross=pattern.cross,
        causal=pattern.causal,
        **options,
    )
    return module.to(device=device, dtype=dtype)


def _uses_default_cache(module: EfficientAttention) -> bool:
    return type(module)._attend_step is EfficientAttention._attend_step


class _Case:
    """The callables of one point: ``reset()`` (unmeasured) then ``call()`` (measured)."""

    def __init__(
        self,
        reset: Callable[[], None],
        call: Callable[[], None],
        live: int,
        prefill_s: float = 0.0,
        state=None,
        steps: int = 0,
    ):
        self.reset, self.call, self.live, self.prefill_s, self.state = reset, call, live, prefill_s, state
        self.steps = steps  # decoding: also time this many consecutive steps (a growing context) after one reset


def _forward_case(module, pattern, x, src) -> _Case:
    module.eval()
    kv = (src, src) if pattern.cross else (x, x)

    def call():
        with torch.no_grad():
            module(x, *kv, need_weights=False)

    live = _nbytes(module.parameters()) + _nbytes([x] + ([src] if pattern.cross else []))
    return _Case(lambda: None, call, live)


def _backward_case(module, pattern, x, src, gen_seed: int) -> _Case:
    module.train()
    x = x.detach().requires_grad_(True)
    src = src.detach().requires_grad_(True) if pattern.cross else None
    kv = (src, src) if pattern.cross else (x, x)
    g = torch.Generator(device=x.device).manual_seed(gen_seed)
    grad_out = torch.randn(x.shape, generator=g, device=x.device).to(x.dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    leaves = params + [x] + ([src] if src is not None else [])

    def reset():
        for t in leaves:
            t.grad = None

    def call():
        out, _ = module(x, *kv, need_weights=False)
        out.backward(grad_out)

    live = _nbytes(module.parameters()) + _nbytes([x, grad_out] + ([src] if src is not None else []))
    return _Case(reset, call, live)


def _decode_case(module, pattern, x, src, length: int, budget: float, device, autocast: Optional[torch.dtype]) -> _Case:
    """Prefill a decoding state of ``length`` tokens, then ``call()`` decodes one token from a copy of it.

    ``reset()`` restores the state as it was after the prefill, so every call
    is the same step at context ``length``.
    """
    module.eval()
    bsz = x.shape[1]
    step = x[:1]
    inc: Dict = {}
    state_dtype = autocast or x.dtype
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
        if pattern.cross:
            module(step, src, src, incremental_state=inc, static_kv=True, need_weights=False)
        elif _uses_default_cache(module):
            shape = (bsz, module.num_kv_heads, length, module.head_dim)
            g = torch.Generator(device=device).manual_seed(length)
            state = {
                "prev_key": torch.randn(shape, generator=g, device=device).to(state_dtype),
                "prev_value": torch.randn(shape, generator=g, device=device).to(state_dtype),
                "prev_key_padding_mask": None,
            }
            module._set_input_buffer(inc, state)
        else:
            _prefill_own_state(module, x, inc, budget)
    sync(device)
    prefill_s = time.perf_counter() - t0
    snapshot = clone_state(inc)
    current: Dict = {}

    def reset():
        current["inc"] = clone_state(snapshot)

    def call():
        with torch.no_grad():
            if pattern.cross:
                module(step, None, None, incremental_state=current["inc"], static_kv=True, need_weights=False)
            else:
                module(step, step, step, incremental_state=current["inc"], need_weights=False)

    state_bytes = _nbytes(module._get_input_buffer(snapshot).values())  # the state at the context length
    live = _nbytes(module.parameters()) + _nbytes([step]) + state_bytes
    return _Case(reset, call, live, prefill_s, state_bytes, steps=8)


def _prefill_own_state(module, x, inc, budget: float) -> None:
    """Prefill a mechanism's own decoding state: one call over all tokens, else token by token."""
    try:
        module(x, x, x, incremental_state=inc, need_weights=False)
        return
    except Exception as exc:  # noqa: BLE001 - a mechanism may only decode one token at a time
        first = classify_exception(exc)
        if first[0] == "oom":
            raise
        logger.debug("one-call prefill failed (%s); prefilling token by token", first[1])
    inc.clear()
    limit = max(10 * budget, 1.0)
    t0 = time.perf_counter()
    for i in range(x.shape[0]):
        module(x[i : i + 1], x[i : i + 1], x[i : i + 1], incremental_state=inc, need_weights=False)
        if time.perf_counter() - t0 > limit:
            raise _BudgetExceeded(f"token-by-token prefill passed {limit:.1f} s at token {i + 1} of {x.shape[0]}")


class _BudgetExceeded(Exception):
    pass


# ------------------------------------------------------------ the point
def measure_point(point: Mapping, extra: Optional[Mapping[str, Type[EfficientAttention]]] = None) -> dict:
    """Measure one point (see the module docstring); never raises for a failing mechanism."""
    result = {"status": "ok", "threads": torch.get_num_threads()}
    case = None
    try:
        device = torch.device(point["device"])
        dtype = DTYPES[point["dtype"]]
        pattern = parse_pattern(point["pattern"])
        length, bsz, heads, dim = (int(point[k]) for k in ("length", "batch", "heads", "dim"))
        budget = float(point.get("budget", math.inf))
        autocast = DTYPES[point["autocast"]] if point.get("autocast") else None
        cls = resolve_mechanism(point["mechanism"], extra)
        torch.manual_seed(int(point.get("seed", 0)))
        module = _build(cls, pattern, heads * dim, heads, device, dtype, point.get("options") or {})
        g = torch.Generator(device=device).manual_seed(int(point.get("seed", 0)) + length)
        x = torch.randn(length, bsz, heads * dim, generator=g, device=device).to(dtype)
        src = torch.randn(length, bsz, heads * dim, generator=g, device=device).to(dtype) if pattern.cross else None
        mode = point["mode"]
        if mode == "forward":
            case = _forward_case(module, pattern, x, src)
        elif mode == "backward":
            case = _backward_case(module, pattern, x, src, int(point.get("seed", 0)) + 1)
        elif mode == "decode":
            case = _decode_case(module, pattern, x, src, length, budget, device, autocast)
        else:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        case = _with_autocast(case, device, autocast)
        result.update(_run_case(case, device, int(point.get("warmup", 1)), int(point.get("repeats", 5)), budget))
    except _BudgetExceeded as exc:
        result.update(status="skipped", reason="budget", detail=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        status, text = classify_exception(exc)
        result.update(status=status, detail=text)
        if status == "error":
            logger.debug("point %s failed:\n%s", point, traceback.format_exc())
    finally:
        del case
    if result["status"] != "ok":  # a failure's traceback may hold tensors: free them before the next point
        _cleanup(point.get("device", "cpu"))
    return result


def _run_case(case: _Case, device: torch.device, warmup: int, repeats: int, budget: float) -> dict:
    timed = run_timed(case.call, case.reset, device, warmup, repeats, budget)
    peak = peak_bytes(case.call, case.reset, device, cpu_peak_bytes)
    out = {
        "time_s": timed["time_s"],
        "times_s": timed["times_s"],
        "repeats": timed["repeats"],
        "cost_s": min(timed["times_s"]),
        "mem_peak_bytes": peak["mem_peak_bytes"],
        "mem_live_bytes": int(case.live),
    }
    if "mem_max_allocated_bytes" in peak:
        out["mem_max_allocated_bytes"] = peak["mem_max_allocated_bytes"]
    if case.state is not None:
        out["state_bytes"] = int(case.state)
        out["prefill_s"] = case.prefill_s
    if case.steps:  # real decoding grows the context every step: shape-dependent costs (plans, recompiles) show here
        case.reset()
        steps = [time_call(case.call, device) for _ in range(case.steps)]
        out["steps_growing_s"] = steps
        out["step_growing_s"] = statistics.median(steps)
    return out


def _with_autocast(case: _Case, device: torch.device, dtype: Optional[torch.dtype]) -> _Case:
    if dtype is None:
        return case
    call = case.call

    def autocast_call():
        with torch.autocast(device.type, dtype=dtype):
            call()

    case.call = autocast_call
    return case


def _cleanup(device) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
