"""Where the time of a module's forward + backward goes on CUDA: kernel launches, GPU busy time, host time.

For each mechanism and pattern in CAB's setting (self-attention on ``(L, B=4, 512)``, 8 heads of 64, bf16
autocast, train mode, ``loss = out.sum()``) it records, from one profiled step after warm-up:

* ``wall_ms``: the step's wall time (CUDA events, median of 5 unprofiled steps);
* ``kernels``: the number of CUDA kernels launched (forward + backward);
* ``gpu_ms``: the summed duration of those kernels (the GPU is idle for ``wall_ms - gpu_ms``);
* ``top``: the five kernels that take the most GPU time.

A step whose ``gpu_ms`` is far below ``wall_ms`` is bound by launches and host work, not arithmetic.

    python benchmarks/profile_launches_gpu.py --out DIR [--lengths 1024 8192] [--mechanisms performer abc]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficient_attention import build_attention  # noqa: E402

DEFAULT = [
    ("vanilla", True),
    ("vanilla", False),
    ("performer", True),
    ("performer", False),
    ("cosformer", True),
    ("cosformer", False),
    ("abc", True),
    ("abc", False),
    ("s4d", True),
    ("s4d", False),
    ("lara", False),
    ("nystrom", False),
    ("probsparse", True),
    ("probsparse", False),
    ("block_sparse", True),
    ("landmark", True),
    ("dilated", True),
    ("local", True),
]


def training_step(m: torch.nn.Module, x: torch.Tensor):
    """One CAB-setting training step of self attention ``m`` on ``x``: bf16 autocast forward, ``out.sum()``
    backward."""

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = m(x, x, x, need_weights=False)
        out.float().sum().backward()

    return step


def median_ms(step, warmup: int = 3, repeats: int = 5) -> float:
    """The median CUDA-event time of ``step()`` in ms, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def profile_one(name: str, causal: bool, length: int) -> dict:
    torch.manual_seed(0)
    m = build_attention(name, embed_dim=512, num_heads=8, causal=causal, self_attention=True).cuda().train()
    x = torch.randn(length, 4, 512, device="cuda", requires_grad=True)
    step = training_step(m, x)
    wall = median_ms(step)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1000.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    cpu_ops: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
            cpu_ops[e.name] = cpu_ops.get(e.name, 0) + 1
    return {
        "mechanism": name,
        "causal": causal,
        "length": length,
        "wall_ms": wall,
        "kernels": len(kernels),
        "gpu_ms": sum(e.device_time for e in kernels) / 1000.0,
        "top": [(n[:70], round(t, 3)) for n, t in top],
        "aten_ops": sum(cpu_ops.values()),
        "top_aten": sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:12],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 8192])
    p.add_argument("--mechanisms", nargs="+", default=None, help="names; 'name:causal' or 'name:noncausal'")
    args = p.parse_args()
    cases = DEFAULT
    if args.mechanisms:
        cases = []
        for s in args.mechanisms:
            n, _, pat = s.partition(":")
            cases += [(n, c) for c in (True, False) if not pat or (pat == "causal") == c]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, causal in cases:
        for length in args.lengths:
            try:
                r = profile_one(name, causal, length)
            except Exception as exc:  # noqa: BLE001 - one failing point must not stop the sweep
                r = {
                    "mechanism": name,
                    "causal": causal,
                    "length": length,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            rows.append(r)
            if "error" in r:
                print(
                    f"{name:12s} {'causal' if causal else 'noncausal':9s} L={length:6d} ERROR {r['error']}", flush=True
                )
            else:
                print(
                    f"{name:12s} {'causal' if causal else 'noncausal':9s} L={length:6d} wall {r['wall_ms']:8.2f} ms"
                    f"  gpu {r['gpu_ms']:8.2f} ms  kernels {r['kernels']:5d}  aten {r['aten_ops']:5d}",
                    flush=True,
                )
                print("      top:", "; ".join(f"{n} {t}" for n, t in r["top"]), flush=True)
                print("      aten:", ", ".join(f"{n[6:]}x{c}" for n, c in r["top_aten"]), flush=True)
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    (args.out / "profile_launches.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
