"""What is alive at the peak of a training step: the allocations behind ``mechanisms_gpu.py``'s peak memory.

Issue 13 asks for peak memory no more than SDPA's from 8k on.  This script runs the benchmark's step
(``efficient_attention/benchmark/timing.py``'s ``train_case``: self attention on ``(L, B=4, 512)``, 8 heads of 64,
bf16 autocast over fp32 weights, forward + backward of ``out.float().sum()``) once to warm up, then once under
``torch.cuda.memory._record_memory_history`` and replays the trace to the moment the step's allocations peak.  It
prints the peak (extra over what was live before the step, as ``mem_peak_bytes``), and the tensors alive then,
largest first, each with its size in units of one ``(L, B, 512)`` bf16 tensor and the innermost frame in this
library (``<autograd>`` for an allocation made by a C++ backward formula); and the step's time (median of 10
steps, each from an idle GPU, as ``mechanisms_gpu.py`` times them).

    python benchmarks/memory_peak_gpu.py --out DIR [--length 8192] [--cases performer:noncausal ...]

Writes ``DIR/memory_peak_gpu.json``.  Needs CUDA.  About a minute on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from profile_launches_gpu import median_ms  # noqa: E402 - benchmarks/ (this script's folder)

from efficient_attention.benchmark.timing import train_case  # noqa: E402
from efficient_attention.registry import build_attention  # noqa: E402

EMBED, HEADS, BATCH = 512, 8, 4
CASES = (
    "vanilla:noncausal",
    "vanilla:causal",
    "performer:noncausal",
    "cosformer:noncausal",
    "cosformer:causal",
    "nystrom:noncausal",
    "s4d:noncausal",
    "s4d:causal",
    "probsparse:causal",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site(frames) -> str:
    """The innermost frame in this library (``file:line function``), else ``<autograd: Node>`` naming the C++
    backward node that allocated it (``<autograd>`` where the trace has no C++ frames)."""
    for f in frames:
        name = f.get("filename", "")
        if "efficient_attention" in name and "benchmark" not in name:
            return f"{os.path.relpath(name, ROOT)}:{f.get('line')} {f.get('name')}"
    for f in frames:
        node = f.get("name", "")
        if "autograd::generated::" in node or "AccumulateGrad" in node:
            return f"<autograd: {node.split('::')[-2 if node.endswith('apply') else -1].split('(')[0]}>"
    return "<autograd>"


def live_at_peak(trace) -> tuple:
    """``(peak bytes, [(bytes, site), ...] alive then, the site whose allocation reached the peak)`` from one
    device's trace of allocator events."""
    live, total, peak, at_peak, last = {}, 0, 0, {}, ""
    for ev in trace:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, _site(ev.get("frames", [])))
            total += size
            if total > peak:
                peak, at_peak, last = total, dict(live), live[addr][1]
        elif action == "free_requested" and addr in live:
            total -= live.pop(addr)[0]
    return peak, sorted(at_peak.values(), key=lambda x: -x[0]), last


def run_case(spec: str, length: int) -> dict:
    name, _, pattern = spec.partition(":")
    causal = pattern == "causal"
    device = torch.device("cuda")
    torch.manual_seed(0)
    module = build_attention(name, embed_dim=EMBED, num_heads=HEADS, self_attention=True, causal=causal).to(device)
    call, reset = train_case(module, length, BATCH, EMBED, device, torch.bfloat16)
    reset()
    call()
    reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="all")  # C++ frames: backward nodes
    call()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_stats = torch.cuda.max_memory_allocated() - before
    # the step's time as mechanisms_gpu.py takes it: each step from an idle GPU, CUDA events
    ms = median_ms(lambda: (reset(), call()), warmup=2, repeats=10)
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, alive, peak_site = live_at_peak(trace)
    unit = length * BATCH * EMBED * 2
    grouped: dict = {}
    for size, site in alive:
        grouped.setdefault(site, []).append(size)
    rows = sorted(((sum(s), len(s), site) for site, s in grouped.items()), key=lambda r: -r[0])
    del module
    torch.cuda.empty_cache()
    return {
        "case": spec,
        "length": length,
        "peak_mib": peak_stats / 2**20,
        "ms": ms,
        "trace_peak_mib": peak / 2**20,
        "unit_mib": unit / 2**20,
        "peak_site": peak_site,
        "alive": [{"mib": b / 2**20, "units": b / unit, "tensors": n, "site": site} for b, n, site in rows],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--cases", nargs="+", default=list(CASES), help="name:noncausal or name:causal")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.cases:
        try:
            r = run_case(spec, args.length)
        except Exception as exc:  # noqa: BLE001 - one case's failure must not stop the others
            print(f"{spec}: ERROR {type(exc).__name__}: {exc}", flush=True)
            continue
        results.append(r)
        print(
            f"\n{spec} L={r['length']}: {r['ms']:.2f} ms, peak {r['peak_mib']:.0f} MiB "
            f"(trace {r['trace_peak_mib']:.0f}, reached allocating at {r['peak_site']}), unit {r['unit_mib']:.0f} MiB",
            flush=True,
        )
        for a in r["alive"][:14]:
            print(f"  {a['mib']:8.1f} MiB {a['units']:5.2f} u  x{a['tensors']:<3d} {a['site']}", flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (args.out / "memory_peak_gpu.json").write_text(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
