"""``_triton_common.launch``: the cached launch passes a compiled kernel exactly what Triton's own launch would.

No GPU here: the kernels' ``run`` (binding, compiling, launching) is replaced by a recorder that binds the
arguments with the kernel's signature the way Triton does, and returns a stand-in compiled kernel whose
launcher records what the cached path hands it.  Skipped where Triton is not installed.
"""

import importlib.util
import inspect

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


class _Compiled:
    """A stand-in compiled kernel: ``run`` records the launcher's arguments."""

    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, lmeta, enter, exit_, *args):
        self.log.append(("cached", (g0, g1, g2), args))


@pytest.fixture
def recorded(monkeypatch):
    import triton

    from efficient_attention.kernels import _triton_common as tc

    if triton.runtime.JITFunction is None or not hasattr(tc, "launch"):
        pytest.skip("no Triton JIT")
    tc._launch_cache.clear()
    monkeypatch.setattr(tc, "_current_stream", lambda: (0, 0))
    log: list = []

    def patch(fn):
        sig = inspect.signature(fn.fn)
        compiled = _Compiled(log)

        def run(*args, grid, warmup, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg", "debug") if k in kwargs}
            bound = sig.bind(*args, **kwargs)
            assert not set(kwargs) - set(sig.parameters), options
            log.append(("jit", tuple(grid) + (1,) * (3 - len(grid)), tuple(bound.arguments.values())))
            return compiled

        monkeypatch.setattr(fn, "run", run)
        return fn

    yield tc, patch, log
    tc._launch_cache.clear()


def _block_sparse_args(dtype=torch.bfloat16, T=256):
    q = torch.zeros(2, 2, T, 64, dtype=dtype)
    lse = torch.zeros(2, 2, T)
    i32 = torch.zeros(4, dtype=torch.int32)
    u8 = torch.zeros(4, dtype=torch.uint8)
    tensors = (q, q, q, q, q, u8, i32, i32, i32, i32, u8, q, lse)  # (Q, K, V, KD, VD, KPM, QPOS, LUT, CNT, ...)
    scalars = (0.18, 2, T, T, T * 64, 64, T * 64, 64, 0, 1, 9, 9, 2, 4, 4)
    meta = dict(
        CAUSAL=True, WINDOW=False, USE_LUT=True, HAS_KPM=False, HAS_TILES=False, HAS_QPOS=False, IEEE=False,
        HEAD_DIM=64,
        BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, LUT_BLOCK=64, TMA=False,
    )  # fmt: skip
    return tensors, scalars, meta


def test_cached_launch_passes_the_bound_arguments(recorded):
    from efficient_attention.kernels import _triton_kernels as tk

    tc, patch, log = recorded
    fn = patch(tk._fwd_kernel)
    tensors, scalars, meta = _block_sparse_args()
    tc.launch(fn, (2, 4), tensors, scalars, meta)
    tc.launch(fn, (2, 4), tensors, scalars, meta)
    assert [e[0] for e in log] == ["jit", "cached"]
    assert log[1][1] == log[0][1] == (2, 4, 1)
    assert len(log[1][2]) == len(log[0][2]) == len(fn.arg_names)
    assert all(a is b for a, b in zip(log[1][2], log[0][2]))  # the same objects, in the signature's order


def test_cached_launch_keys_on_what_triton_specializes(recorded):
    from efficient_attention.kernels import _triton_kernels as tk

    tc, patch, log = recorded
    fn = patch(tk._fwd_kernel)
    tensors, scalars, meta = _block_sparse_args()
    tc.launch(fn, (2, 4), tensors, scalars, meta)
    other_len = _block_sparse_args(T=320)[:2]  # other integers
    tc.launch(fn, (2, 5), *other_len, meta)
    fp16 = _block_sparse_args(dtype=torch.float16)[0]  # other dtypes
    tc.launch(fn, (2, 4), fp16, scalars, meta)
    tc.launch(fn, (2, 4), tensors, scalars, dict(meta, num_warps=8))  # other options
    q = torch.zeros(2 * 2 * 256 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 2, 256, 64)  # misaligned: never cached
    for _ in range(2):
        tc.launch(fn, (2, 4), (q,) + tensors[1:], scalars, meta)
    assert [e[0] for e in log] == ["jit"] * 6
    tc.launch(fn, (2, 5), *other_len, meta)
    assert log[-1][0] == "cached" and log[-1][1] == (2, 5, 1)


def test_launch_takes_tritons_path_for_descriptors_and_when_off(recorded, monkeypatch):
    from efficient_attention.kernels import _triton_kernels as tk

    tc, patch, log = recorded
    fn = patch(tk._fwd_kernel)
    tensors, scalars, meta = _block_sparse_args()
    desc = (object(), object())  # (TMA descriptors: not keyed, always Triton's own launch)
    for _ in range(2):
        tc.launch(fn, (2, 4), tensors[:3] + desc + tensors[5:], scalars, meta)
    monkeypatch.setattr(tc, "FAST_LAUNCH", False)
    for _ in range(2):
        tc.launch(fn, (2, 4), tensors, scalars, meta)
    assert [e[0] for e in log] == ["jit"] * 4


def test_a_launcher_that_refuses_the_arguments_turns_the_cache_off(recorded, monkeypatch):
    from efficient_attention.kernels import _triton_kernels as tk

    tc, patch, log = recorded
    fn = patch(tk._fwd_kernel)
    tensors, scalars, meta = _block_sparse_args()
    monkeypatch.setattr(tc, "FAST_LAUNCH", True)
    tc.launch(fn, (2, 4), tensors, scalars, meta)
    compiled = next(iter(tc._launch_cache.values()))[0]

    def refuse(*args):
        raise TypeError("function takes exactly 40 arguments")

    monkeypatch.setattr(compiled, "run", refuse)
    tc.launch(fn, (2, 4), tensors, scalars, meta)  # falls back to Triton's launch
    assert [e[0] for e in log] == ["jit", "jit"] and not tc.FAST_LAUNCH and not tc._launch_cache
