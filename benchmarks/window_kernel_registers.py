"""Registers, spills and shared memory of the sliding-window kernels, compiled for sm_90a without a GPU.

Triton compiles for a named target on any machine (its bundled ``ptxas`` and ``cuobjdump`` do the rest), so a
config's register count per thread, its stack frame (spills) and its shared memory can be read before a device
run: they decide how many programs share a multiprocessor (65536 registers and 228 KB of shared memory on an
H100 / H200).  The counts come out 20-50 registers above those of the kernels launched on the H200 (there Triton
specialises the arguments: divisible-by-16 pointers and sizes, a group of 1), so read them as a ranking and the
shared memory as exact.  Each spec is ``kernel,head_dim,BLOCK_M,BLOCK_N,warps,stages[,tma][,rNNN]`` (``rNNN``: maxnreg):

    python benchmarks/window_kernel_registers.py fwd,64,64,64,4,3,tma dkdv,128,64,128,8,3,tma,r168
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from efficient_attention.kernels import _triton_kernels as tk  # noqa: E402

KERNELS = {"fwd": tk._fwd_kernel, "dq": tk._bwd_dq_kernel, "dkdv": tk._bwd_dkdv_kernel}
FLOATS = ("qk_scale", "sm_scale")
U8 = ("KPM", "TILES")
I32 = ("LUT", "CNT", "TILE")
F32 = ("Lse", "Delta", "DLse")
DESCRIPTORS = ("KD", "VD", "QD", "DOD")
BF16 = ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ") + DESCRIPTORS


def signature(fn, const: dict, rows: int, d: int, tma: bool) -> dict:
    """Argument types of a causal bf16 window launch (no padding mask, no lookup table)."""
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in U8:
            sig[name] = "*u8"
        elif name in I32:
            sig[name] = "*i32"
        elif name in F32:
            sig[name] = "*fp32"
        elif name in DESCRIPTORS and tma:
            sig[name] = f"tensordesc<bf16[1,{rows},{d}]>"
        elif name in BF16:
            sig[name] = "*bf16"
        else:
            sig[name] = "i32"
    return sig


def resources(spec: str) -> str:
    kind, d, bm, bn, warps, stages, *rest = spec.split(",")
    fn, d, bm, bn = KERNELS[kind], int(d), int(bm), int(bn)
    tma = "tma" in rest
    const = dict(CAUSAL=True, WINDOW=True, USE_LUT=False, HAS_KPM=False, IEEE=False, BLOCK_M=bm, BLOCK_N=bn)
    const.update(HEAD_DIM=d, LUT_BLOCK=max(bm, bn, 64), TMA=tma, HAS_TILES=False)
    if "HAS_DLSE" in fn.arg_names:
        const["HAS_DLSE"] = False
    rows = bm if kind == "dkdv" else bn  # the tiles loaded in the loop: queries for dk/dv, keys otherwise
    options = dict(num_warps=int(warps), num_stages=int(stages))
    for r in rest:
        if r.startswith("r"):
            options["maxnreg"] = int(r[1:])
    src = ASTSource(fn, signature(fn, const, rows, d, tma), constexprs=const)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    regs, stack = (int(x) for x in m.groups()) if m else (-1, -1)
    smem = kernel.metadata.shared
    threads = int(warps) * 32
    per_sm = min(65536 // (threads * -(-regs // 8) * 8), 233472 // (smem + 1024)) if regs > 0 else -1
    return f"{spec:32s} regs {regs:3d}  stack {stack:4d} B  smem {smem / 1024:6.1f} KB  programs/SM {per_sm}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("specs", nargs="+", help="kernel,head_dim,BLOCK_M,BLOCK_N,warps,stages[,tma][,rNNN]")
    for spec in p.parse_args().specs:
        print(resources(spec), flush=True)


if __name__ == "__main__":
    main()
