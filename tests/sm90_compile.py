"""Compile for an H100 / H200 (sm_90) every Triton kernel variant that a CPU run launches under the interpreter.

Triton's interpreter runs a kernel's Python on the CPU: it accepts programs the GPU compiler rejects (a global
that is not a ``tl.constexpr``, a ``tl.dot`` with a side under 16) and never allocates shared memory (an sm_90
block may use 227 KiB), so a kernel tested only there can still fail to build or launch on the device.  This
script closes that gap without a GPU, in two steps:

1. record (under ``TRITON_INTERPRET=1``): :func:`recording` wraps the interpreter's launch and writes, for every
   distinct launch, the kernel, its argument types (tensors by dtype and 16-byte alignment, integers by the
   classes Triton specialises on: 1, a multiple of 16, other, 64-bit), its constexprs and launch options.  Three
   workloads: ``tests/triton_interpreter_cases.py`` (when ``EA_SM90_RECORD`` names a file), ``record-mechanisms``
   (a bf16 step of every mechanism with a kernel, run) and ``record-shapes`` (CAB's setting at long lengths, the
   kernels not run: the tiles, segments and TMA loads a benchmark on an H200 launches).
2. ``compile`` (without the interpreter): each recorded variant goes through Triton's own specialisation (the
   binder a launch uses) and ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; the cubin's registers and
   stack (``cuobjdump``) and its shared memory are checked against what an sm_90 block may use.  Exits non-zero
   listing every variant that fails.

    TRITON_INTERPRET=1 EA_SM90_RECORD=/tmp/launches.pkl python tests/triton_interpreter_cases.py
    TRITON_INTERPRET=1 python tests/sm90_compile.py record-shapes /tmp/shapes.pkl --lengths 1024 8192
    python tests/sm90_compile.py compile /tmp/launches.pkl

``tests/test_kernels_triton_interpreter.py`` runs them in CI.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SM90_SHARED_BYTES = 232448  # 227 KiB: the most dynamic shared memory one block may use on sm_90
SM90_REGISTERS = 65536  # per multiprocessor, so per block at most
SM90_MAX_REGS_PER_THREAD = 255


# ---------------------------------------------------------------------------------------------- recording


def _int_class(x: int) -> int:
    """A representative of the values Triton compiles alike: 1 and multiples of 16 are specialised, 64-bit apart."""
    if x == 1:
        return 1
    if abs(x) >= 2**31:
        return 2**40 + (16 if x % 16 == 0 else 3)
    return 16 if x % 16 == 0 else 3


def _describe(value, constexpr: bool):
    import torch
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if isinstance(value, TensorDescriptor):
        base = _describe(value.base, False)
        return ("desc", base, tuple(value.shape), tuple(value.strides), tuple(value.block_shape), value.padding)
    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, tl.dtype):
        return ("tl.dtype", value.name)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return ("value", value)
    if isinstance(value, int):
        return ("value", value if constexpr else _int_class(value))
    if isinstance(value, float):
        return ("value", value if constexpr else 0.5)
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return ann is not inspect.Parameter.empty and ("constexpr" in str(ann))


@contextlib.contextmanager
def recording(path: str, execute: bool = True):
    """Record every distinct interpreted launch while the block runs; write them to ``path`` (pickle) on exit.
    ``execute=False``: the kernels are not run (their outputs stay unwritten), for the shapes of long sequences."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = {p.name: p for p in inspect.signature(fn).parameters.values()}
        bound = dict(zip(params, args))
        bound.update(kwargs)  # (launch options are not parameters: described as constants)
        described = tuple(
            (name, _describe(value, _is_constexpr(params[name]) if name in params else True))
            for name, value in bound.items()
        )
        seen.setdefault((fn.__module__, fn.__name__, described), None)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

    InterpretedFunction.run = run
    try:
        yield seen
    finally:
        InterpretedFunction.run = original
        with open(path, "wb") as f:
            pickle.dump(list(seen), f)


def _as_on_an_h200() -> None:
    """The branches a CUDA step takes, on CPU tensors: the switches ``benchmarks/host_ops.py`` sets, an H200's 132
    multiprocessors for the linear attention's segments, and TMA loads wherever the tensors are aligned for them."""
    import torch

    from efficient_attention import base
    from efficient_attention.attentions import abc, performer
    from efficient_attention.kernels import triton_ops

    linear_attention = importlib.import_module("efficient_attention.kernels.linear_attention")  # (not the function)

    base.FUSED_PROJECTION_DEVICES = ("cpu", "cuda")
    abc.ABC.SCAN_DEVICES = ("cpu", "cuda")
    abc.ABC.IN_PLACE_DEVICES = ("cpu", "cuda")
    performer.Performer.FUSED_STEP_DEVICES = ("cpu", "cuda")
    linear_attention._SMS[torch.device("cpu")] = 132
    triton_ops._tma_ok = _tma_aligned  # (an H200 has TMA: the alignment decides)


def _tma_aligned(*ts, strides=()) -> bool:
    """``triton_ops._tma_ok`` on a device with TMA: 16-byte aligned bases and strides."""
    size = ts[0].element_size()
    return all(t.data_ptr() % 16 == 0 for t in ts) and all(s * size % 16 == 0 for s in strides)


def _mechanism_steps(length: int, batch: int, decode: int) -> None:
    """Every registered mechanism in each self pattern it supports, in CAB's head shape (8 heads of 64, bf16
    autocast): one training step on ``(length, batch, 512)`` and, for causal ones that decode, a prefill of
    ``length`` positions and ``decode`` steps after it.  Mechanisms without a Triton kernel (``vanilla``,
    ``blockwise``, ``lara``) are left out."""
    import torch

    from efficient_attention import available_attentions, build_attention
    from efficient_attention.capabilities import Pattern

    for name, info in available_attentions().items():
        if not {"triton", "kernels"} & {b.split(".")[0] for b in info.capabilities.backends}:
            continue
        for pattern in (Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF):
            if pattern not in info.capabilities.patterns:
                continue
            start = time.perf_counter()
            torch.manual_seed(0)
            extra = {"max_len": 2 * length} if name == "cosformer" and pattern.causal else {}  # (decoding needs it)
            # S4D's kernels run one program per channel: one head of 64 compiles alike and interprets 8x faster
            embed, heads = (64, 1) if name == "s4d" else (512, 8)
            m = build_attention(
                name, embed_dim=embed, num_heads=heads, causal=pattern.causal, self_attention=True, **extra
            )
            x = torch.randn(length, batch, embed, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = m(x, x, x, need_weights=False)
            out.float().sum().backward()
            if decode and pattern.causal and info.capabilities.incremental:
                m.eval()
                state: dict = {}
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    m(x, x, x, incremental_state=state, need_weights=False)  # the prompt: prefill
                    for t in range(decode):
                        m(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state, need_weights=False)
            print(f"recorded {name} {pattern} at {length} ({time.perf_counter() - start:.1f} s)", flush=True)


def record_mechanisms(path: str, length: int = 128) -> None:
    """One bf16 training step (and a prefill and three decoding steps) of every mechanism with a Triton kernel,
    the kernels run by the interpreter: the variants of a short sequence."""
    _as_on_an_h200()
    with recording(path):
        _mechanism_steps(length, 1, 3)


def record_shapes(path: str, lengths, batch: int = 4) -> None:
    """The variants of CAB's setting ``(L, 4, 512)`` at each of ``lengths`` (tiles, segments and TMA loads depend
    on the length), the kernels not run: a training step of every mechanism with a Triton kernel, and a prefill of
    ``L`` positions with one decoding step after it for the causal ones."""
    _as_on_an_h200()
    with recording(path, execute=False):
        for length in lengths:
            _mechanism_steps(length, batch, 1)


# ---------------------------------------------------------------------------------------------- compiling


def _rebuild(desc):
    import torch
    import triton.language as tl
    from triton.runtime.jit import MockTensor
    from triton.tools.tensor_descriptor import TensorDescriptor

    kind = desc[0]
    if kind == "tensor":
        t = MockTensor(getattr(torch, desc[1]))
        if not desc[2]:
            t.data_ptr = lambda: 8  # an off-16 address: Triton specialises the pointer's alignment
        return t
    if kind == "desc":
        _, base, shape, strides, block, padding = desc
        return TensorDescriptor(_rebuild(base), list(shape), list(strides), list(block), padding)
    if kind == "tl.dtype":
        return getattr(tl, desc[1]) if hasattr(tl, desc[1]) else tl.dtype(desc[1])
    return desc[1]


def _cuobjdump(cubin: bytes) -> tuple[int, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def compile_one(spec) -> tuple[str, str | None]:
    """Compile one recorded launch for sm_90: ``(description, None)`` or ``(description, what is wrong)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    module, name, described = spec
    fn = getattr(importlib.import_module(module), name)
    kwargs = {k: _rebuild(v) for k, v in described}
    launch = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    consts = " ".join(
        f"{k}={v[1]}" for k, v in described if k in fn.arg_names and fn.params[fn.arg_names.index(k)].is_constexpr
    )
    dtypes = ",".join(sorted({v[1] for _, v in described if v[0] == "tensor"}))
    opts = " ".join(f"{k}={v}" for k, v in launch.items())
    label = f"{module.rsplit('.', 1)[-1]}.{name} [{dtypes}] {consts} {opts}"
    try:
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, launch, bound, specialization, options)
        kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported, with the variant, by the caller
        where, cause = str(e).strip().splitlines()[:1], e
        while cause.__cause__ is not None:  # Triton's CompilationError ("at line:col") wraps the error itself
            cause = cause.__cause__
        msg = str(cause).strip()  # (a CompilationError: the source around the error, the error on its last line)
        what = f"{msg.splitlines()[-1][:300]} in: {msg[:600]}" if msg else ""
        return label, f"does not compile ({' '.join(where)[:80]}): {type(cause).__name__}: {what}"
    regs, stack = _cuobjdump(kernel.asm["cubin"])
    threads = options.num_warps * 32
    smem = kernel.metadata.shared
    label += f"  (regs {regs}, stack {stack} B, smem {smem / 1024:.1f} KiB)"
    if smem > SM90_SHARED_BYTES:
        return label, f"needs {smem} B of shared memory, more than sm_90's {SM90_SHARED_BYTES}"
    if regs * threads > SM90_REGISTERS or regs > SM90_MAX_REGS_PER_THREAD:
        return label, f"needs {regs} registers x {threads} threads, more than sm_90's {SM90_REGISTERS}"
    return label, None


def compile_all(path: str, workers: int = 2, verbose: bool = False) -> int:
    with open(path, "rb") as f:
        specs = pickle.load(f)
    failures = []
    with ProcessPoolExecutor(workers) as pool:
        for i, (label, problem) in enumerate(pool.map(compile_one, specs), 1):
            if problem:
                failures.append(f"{label}: {problem}")
            if verbose or problem:
                print(
                    f"{'FAIL' if problem else 'ok  '} {i}/{len(specs)} {label}{': ' + problem if problem else ''}",
                    flush=True,
                )
    print(f"{len(specs) - len(failures)} of {len(specs)} recorded kernel variants compile for sm_90")
    return 1 if failures else 0


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["compile", "record-mechanisms", "record-shapes"])
    p.add_argument("path", help="the launches recorded by `recording` (pickle)")
    p.add_argument("--length", type=int, default=128, help="record-mechanisms: the training step's length")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768], help="record-shapes: lengths")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-v", "--verbose", action="store_true", help="print every variant, not only failures")
    a = p.parse_args()
    if a.command.startswith("record"):
        assert os.environ.get("TRITON_INTERPRET") == "1", "record under TRITON_INTERPRET=1"
        if a.command == "record-shapes":
            record_shapes(a.path, a.lengths)
        else:
            record_mechanisms(a.path, a.length)
        return 0
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile without TRITON_INTERPRET (it replaces the kernels)"
    return compile_all(a.path, a.workers, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
