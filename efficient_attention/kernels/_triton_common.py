"""``@triton.jit`` helpers shared by the attention kernels (``_triton_kernels.py``, ``_triton_landmark.py``).

Tiles are row-major ``(rows, HEAD_DIM)`` slices of one head; scores are kept in log2 units (``exp2``), the
log-sum-exp is handed over in natural units.  Imported only when Triton is installed.
"""

import logging
import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b``; fp32 inputs (``IEEE``) in full IEEE fp32, else the tensor cores' default precision."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_rows(base, offs_r, n_rows, offs_d, stride):
    """Rows ``offs_r`` (``stride`` elements apart: ``HEAD_DIM`` when contiguous) of one head at ``base``, zero past
    ``n_rows``."""
    return tl.load(base + offs_r[:, None] * stride + offs_d[None, :], mask=offs_r[:, None] < n_rows, other=0.0)


@triton.jit
def _store_rows(base, x, offs_r, n_rows, offs_d, stride):
    """Stores ``x`` (cast to the tensor's dtype) into rows ``offs_r`` (those below ``n_rows``, ``stride``
    elements apart) of one head at ``base``."""
    tl.store(
        base + offs_r[:, None] * stride + offs_d[None, :], x.to(base.dtype.element_ty), mask=offs_r[:, None] < n_rows
    )


@triton.jit
def _lse2(lse):
    """A stored (natural-unit) log-sum-exp in log2 units; ``-inf`` (an empty row) becomes ``+inf`` (weights 0)."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _finish(acc, m_i, l_i):
    """The online softmax's end: ``(out, lse)`` from the accumulator, the running max (log2 units) and the
    normaliser; a row that saw nothing gets ``out = 0``, ``lse = -inf``."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


# -- host side: launching a compiled kernel without Triton's per-call binding ------------------------------------
# ``kernel[grid](*args, **meta)`` binds every argument, specializes each one (dtype, 16-byte alignment, integer
# divisibility), builds a cache key string and looks the compiled kernel up: tens of microseconds of Python per
# launch, on a step that is host-bound below ~8k (three launches a block-sparse or landmark step).  ``launch``
# keys the compiled kernel by a cheaper, stricter tuple -- each tensor's dtype and alignment, every other
# argument's exact value, the meta-parameters -- and calls its launcher directly after the first (normal) launch.
# A key never maps to a kernel compiled for other specializations (exact values are finer than Triton's keys; only
# launches whose tensors are all 16-byte aligned, as the caching allocator's are, take the cached path).
# ``FAST_LAUNCH = False`` (or ``EA_TRITON_LAUNCH=jit`` in the environment) keeps Triton's own path for every
# launch; TMA descriptors and misaligned tensors always take it.
try:
    from triton import knobs as _knobs
except ImportError:  # (an older Triton: its own launch path only)
    _knobs = None
FAST_LAUNCH = _knobs is not None and os.environ.get("EA_TRITON_LAUNCH", "cached").lower() != "jit"
_MAX_CACHED = 512  # compiled-kernel entries kept (shapes x layouts x devices); the cache restarts past it
_launch_cache: dict = {}


_stream_fns: list = []


def _current_stream():
    """``(device index, raw stream)`` Triton launches on (its current device's current stream)."""
    if not _stream_fns:
        drv = triton.runtime.driver.active
        _stream_fns[:] = [drv.get_current_device, drv.get_current_stream]
    dev = _stream_fns[0]()
    return dev, _stream_fns[1](dev)


def launch(fn, grid: tuple, tensors: tuple, scalars: tuple, meta: dict) -> None:
    """``fn[grid](*tensors, *scalars, **meta)`` for a ``@triton.jit`` kernel ``fn``: its leading positional
    arguments, the tensors (or TMA descriptors) then the numbers, and the remaining parameters by name
    (constexprs) with the launch options (``num_warps``, ``num_stages``, ``maxnreg``) in ``meta``.  A repeated
    launch (same dtypes, numbers and ``meta``, every tensor 16-byte aligned) calls the compiled kernel's launcher
    directly."""
    args = tensors + scalars
    if not FAST_LAUNCH or not isinstance(fn, triton.runtime.JITFunction):
        fn[grid](*args, **meta)
        return
    try:
        aligned = not any([t.data_ptr() % 16 for t in tensors])
    except AttributeError:  # a TMA descriptor: Triton's own launch (it keys descriptors by their blocks)
        aligned = False
    if not aligned:  # (and a tensor off 16 bytes: Triton specializes each one's alignment; the key does not)
        fn[grid](*args, **meta)
        return
    dev, stream = _current_stream()
    key = (id(fn), dev, tuple([t.dtype for t in tensors]), scalars, tuple(meta.items()))  # (kernels: module globals)
    hit = _launch_cache.get(key)
    if hit is None:
        kernel = fn[grid](*args, **meta)  # compiles (or finds) and launches: the normal path, once per key
        if kernel is not None and not hasattr(kernel, "result") and hasattr(kernel, "packed_metadata"):
            if len(_launch_cache) >= _MAX_CACHED:
                _launch_cache.clear()
            _launch_cache[key] = (kernel, tuple(meta[n] for n in fn.arg_names[len(args) :]))
        return
    kernel, tail = hit
    enter = _knobs.runtime.launch_enter_hook
    full = args + tail
    # (the hooks are a chain, empty unless a profiler added one: then the metadata is built as Triton would)
    lmeta = kernel.launch_metadata(grid, stream, *full) if enter is not None and getattr(enter, "calls", True) else None
    try:
        kernel.run(
            grid[0],
            grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            stream,
            kernel.function,
            kernel.packed_metadata,
            lmeta,
            enter,
            _knobs.runtime.launch_exit_hook,
            *full,
        )
    except (TypeError, AttributeError) as exc:  # the launcher refused the arguments (before launching anything):
        _give_up(exc)  # a Triton whose compiled kernels take them otherwise; its own launch from now on
        fn[grid](*args, **meta)


def _give_up(exc: Exception) -> None:
    global FAST_LAUNCH
    FAST_LAUNCH = False
    _launch_cache.clear()
    logging.getLogger(__name__).warning(
        "cached Triton launches turned off (%s: %s); kernels launch through Triton's own path", type(exc).__name__, exc
    )
