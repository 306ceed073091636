"""The host side of a module's CUDA training step, measured on a machine without a GPU.

Below 8k tokens every mechanism's forward + backward on an H200 is bound by the host: Python, autograd and
ATen dispatch at 9-20 us an op (``profile_launches_gpu.py`` shows GPU busy time far under the wall time).  This
script runs the path a CUDA step takes -- the Triton backends selected, their launches made -- on small CPU
tensors with every ``@triton.jit`` kernel replaced by a stub that computes nothing, so what is left is the host
work: it prints the ATen ops, the Triton launches and the microseconds of one training step (the second step of
a length, as in training; the stubs leave outputs unwritten, so the numbers are only the host's).

It runs Triton's interpreter mode (``TRITON_INTERPRET=1``, set here) only so that the Triton backends accept
CPU tensors; the projections are fused as on CUDA (``base.FUSED_PROJECTION_DEVICES``).  Branches a mechanism
takes on ``is_cuda`` alone still take their CPU side here: compare op counts
with ``profile_launches_gpu.py`` on the device before trusting a change.

    python benchmarks/host_ops.py performer cosformer:causal --length 256 --embed-dim 512 --heads 8

``--memory`` also prints the peak of the step's allocations (CPU allocator, ``cpu_peak_bytes``) and its ratio
to ``vanilla``'s: the CUDA path's tensors with the kernels' outputs allocated but unwritten, so a change to
what a mechanism saves or frees can be checked here before a device run (SDPA on the CPU saves what the
CUDA flash kernel saves: q, k, v, the output and the log-sum-exp).

    python benchmarks/host_ops.py vanilla cosformer:causal --length 8192 --batch 4 --embed-dim 512 --heads 8 \
        --repeats 1 --memory

``--live N`` lists the N largest storages alive at the step's peak, by the lines of this library that made them
(weak references to every storage an op creates: exact, where ``--memory``'s profiler sum can only over-count).
Its peaks of the CUDA path match the H200's allocator trace (``memory_peak_gpu.py``) to the MiB for S4D (442 and
570 MiB at 8k in CAB's setting) and causal ProbSparse (419): the first place to look for what holds a peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from efficient_attention import base, build_attention  # noqa: E402
from efficient_attention.attentions import abc  # noqa: E402
from efficient_attention.benchmark.measure import cpu_peak_bytes  # noqa: E402
from efficient_attention.functional import LengthChunks  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts ATen ops (forward and backward) and host syncs (``aten._local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.count, self.syncs, self.names = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        self.names[func.__name__] = self.names.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


class LiveStorages(TorchDispatchMode):
    """Tracks the storages the ops inside it create while they are alive (weak references), and what was alive
    when their total peaked: ``peak`` bytes and ``at_peak``, ``(bytes, site)`` per storage.  A site is the
    innermost two frames of this library that made the op, or ``autograd`` (the engine, e.g. a gradient's sum).
    Only storages made inside count: pass the step's inputs and parameters as ``outside``."""

    def __init__(self, outside=()):
        super().__init__()
        self.live, self.peak, self.at_peak = {}, 0, []
        self.outside = {t.untyped_storage().data_ptr() for t in outside}  # views of these are not the step's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (list, tuple)) else [out]
        for t in outs:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            known = st.data_ptr() in self.live or st.data_ptr() in self.outside  # (views are not counted again)
            if st.nbytes() and not known:
                frames = [f for f in traceback.extract_stack() if "/efficient_attention/" in f.filename]
                site = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:2])
                shape = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes(), f"{site or 'autograd'}  {shape}")
        for key in [k for k, v in self.live.items() if v[0].expired()]:
            del self.live[key]
        total = sum(v[1] for v in self.live.values())
        if total > self.peak:
            self.peak, self.at_peak = total, [(v[1], v[2]) for v in self.live.values()]
        return out


class LaunchStub:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` counts the launch and computes nothing."""

    launches = 0

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            LaunchStub.launches += 1

        return launch


def stub_triton_kernels() -> int:
    """Replace every Triton kernel held by a module of this package with a :class:`LaunchStub`."""
    import importlib
    import pkgutil

    import triton  # noqa: F401 - the kernels' modules import it

    import efficient_attention.kernels as kernels

    for info in pkgutil.iter_modules(kernels.__path__):  # the kernel modules, some imported lazily by their ops
        if info.name.startswith("_triton") or info.name in ("triton_ops", "abc_step", "landmark", "linear_attention"):
            importlib.import_module(f"{kernels.__name__}.{info.name}")

    kinds = (triton.runtime.jit.KernelInterface,)  # JITFunction, and InterpretedFunction under TRITON_INTERPRET
    replaced = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("efficient_attention") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if isinstance(value, kinds):
                setattr(mod, attr, LaunchStub(attr))
                replaced += 1
    return replaced


def measure(
    name: str, causal: bool, length: int, embed_dim: int, heads: int, repeats: int, autocast: bool, batch: int = 2
) -> dict:
    torch.manual_seed(0)
    m = build_attention(name, embed_dim=embed_dim, num_heads=heads, causal=causal, self_attention=True).train()
    x = torch.randn(length, batch, embed_dim, requires_grad=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            out, _ = m(x, x, x, need_weights=False)
        out.sum().backward()
        for p in m.parameters():
            p.grad = None
        x.grad = None

    step()
    LaunchStub.launches = 0
    with CountOps() as ops:
        step()
    launches = LaunchStub.launches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with LiveStorages(outside=[x, *m.parameters()]) as live:
        step()
    return {
        "live_peak_bytes": live.peak,
        "live_at_peak": sorted(live.at_peak, reverse=True),
        "peak_bytes": cpu_peak_bytes(step),
        "ops": ops.count,
        "syncs": ops.syncs,
        "launches": launches,
        "us": sorted(times)[len(times) // 2] * 1e6,
        "top": sorted(ops.names.items(), key=lambda kv: -kv[1])[:10],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mechanisms", nargs="+", help="names; 'name:causal' or 'name:noncausal' for one pattern")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also the step's peak allocation and its ratio to vanilla's")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-autocast", action="store_true", help="fp32 without autocast (default: bf16 autocast)")
    p.add_argument("--top", action="store_true", help="also print the most frequent ATen ops")
    p.add_argument("--live", type=int, default=0, metavar="N", help="also the N largest storages alive at the peak")
    args = p.parse_args()
    torch.set_num_threads(1)
    base.FUSED_PROJECTION_DEVICES = ("cpu", "cuda")  # q, k, v from one product, as on CUDA
    abc.ABC.SCAN_DEVICES = ("cpu", "cuda")  # ABC's normalisers from logcumsumexp, as on CUDA
    abc.ABC.IN_PLACE_DEVICES = ("cpu", "cuda")  # ABC's q, k, v read in place by the (stubbed) Triton kernels
    LengthChunks.DEVICES = ("cpu", "cuda")  # LARA's and Nystrom's products over chunks of the length, as on CUDA
    linear_op = sys.modules["efficient_attention.kernels.linear_attention"]  # (the package exports the function)
    linear_op.SPLIT_K_DEVICES = ("cpu", "cuda")  # the linear attentions' long reductions split, as on CUDA
    stub_triton_kernels()
    vanilla = {}  # causal -> vanilla's peak bytes, for --memory's ratio
    for spec in args.mechanisms:
        name, _, pat = spec.partition(":")
        for causal in (False, True):
            if pat and (pat == "causal") != causal:
                continue
            try:
                sizes = (args.length, args.embed_dim, args.heads, args.repeats)
                r = measure(name, causal, *sizes, not args.no_autocast, args.batch)
            except Exception as exc:  # noqa: BLE001 - one mechanism's failure must not stop the others
                print(f"{name:12s} {'causal' if causal else 'noncausal':9s} ERROR {type(exc).__name__}: {exc}")
                continue
            print(
                f"{name:12s} {'causal' if causal else 'noncausal':9s} ops {r['ops']:5d}  launches {r['launches']:3d}"
                f"  syncs {r['syncs']:2d}  host {r['us']:8.0f} us",
                flush=True,
            )
            if args.memory:
                if name == "vanilla":
                    vanilla[causal] = r["peak_bytes"]
                ratio = f"  vanilla / this {vanilla[causal] / r['peak_bytes']:.2f}" if causal in vanilla else ""
                print(f"    peak {r['peak_bytes'] / 2**20:8.1f} MiB{ratio}", flush=True)
            if args.top:
                print("    ", ", ".join(f"{n}x{c}" for n, c in r["top"]))
            if args.live:
                unit = args.length * args.batch * args.embed_dim * 2  # one (L, B, C) bf16 tensor
                print(
                    f"    alive at the peak: {r['live_peak_bytes'] / 2**20:.1f} MiB = {r['live_peak_bytes'] / unit:.2f}"
                    " units of (L, B, C) bf16",
                    flush=True,
                )
                for nbytes, what in r["live_at_peak"][: args.live]:
                    print(f"      {nbytes / 2**20:8.1f} MiB {nbytes / unit:5.2f} u  {what}")


if __name__ == "__main__":
    main()
