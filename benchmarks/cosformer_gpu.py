"""cosFormer on CUDA (issue 13): correctness, module time and memory against SDPA, the decoding step.

1. ``check``: the module (fp32, and bf16 autocast) against the same module in float64 on the CPU, output and input
   gradient, causal and noncausal, with and without key padding (``linear_floor_gpu.check``: FAIL above 1e-3
   fp32 / 6e-2 bf16 of the largest reference value);
2. ``time``: CAB's setting (self-attention on ``(L, B=4, 512)``, 8 heads of 64, bf16 autocast, train mode,
   forward + backward of ``out.sum()``, projections included), L in 4k, 8k, 32k, median of 5 steps, peak memory
   above the inputs, against ``vanilla`` (SDPA) of the same pattern in the same run; kernels and GPU-busy time
   of one step at 8k and 32k, and the costliest CUDA kernels of cosFormer's 32k steps;
3. the noncausal 32k step again with the state's long reductions not cut into chunks (is the split worth it?);
4. ``decode``: one decoding step (B = 4, one layer, bf16 autocast) at contexts 512 and 8k against vanilla's
   cached step (``decode_step_gpu.run``; the target is <= 2x vanilla).

    python benchmarks/cosformer_gpu.py --out DIR          # < 90 s on an H200
    python benchmarks/cosformer_gpu.py --out DIR --smoke  # tiny CPU run of the same code (no GPU)

Writes ``DIR/cosformer_gpu.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import decode_step_gpu  # noqa: E402
import linear_floor_gpu  # noqa: E402
import torch  # noqa: E402

from efficient_attention.attentions import cosformer as cosformer_module  # noqa: E402

LENGTHS = (4096, 8192, 32768)
CONTEXTS = (512, 8192)


def top_kernels(causal: bool, length: int, device: str, bsz: int, count: int = 8) -> list:
    """The ``count`` costliest CUDA kernels (name, total ms, calls) of one cosFormer step."""
    mod = linear_floor_gpu._module("cosformer", causal, 512, 8, device).train()
    x = torch.randn(length, bsz, 512, device=device, requires_grad=True)
    step = linear_floor_gpu._step_fn(mod, x, device)
    for _ in range(2):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    totals: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms, calls = totals.get(e.name, (0.0, 0))
            totals[e.name] = (ms + e.device_time / 1000.0, calls + 1)
    return sorted(([n[:70], ms, c] for n, (ms, c) in totals.items()), key=lambda r: -r[1])[:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke for a CPU run)")
    lengths = (64, 256) if args.smoke else LENGTHS
    contexts = (16, 64) if args.smoke else CONTEXTS
    bsz = 1 if args.smoke else 4
    started = time.time()
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    result["check"] = [r for causal in (True, False) for r in linear_floor_gpu.check("cosformer", causal, device)]
    print(f"checks done in {time.time() - started:.0f} s", flush=True)
    rows = []
    for name in ("vanilla", "cosformer"):
        for causal in (True, False):
            for length in lengths:
                profile = length in lengths[1:]
                rows.append(linear_floor_gpu.timing(name, causal, length, device, bsz, profile=profile))
    result["time"] = rows
    print(f"timed ({time.time() - started:.0f} s)", flush=True)
    result["top"] = {c: top_kernels(c, lengths[-1], device, bsz) for c in (True, False)}
    chunks = cosformer_module._state_chunks
    cosformer_module._state_chunks = lambda length, x: 1
    try:
        result["unsplit"] = linear_floor_gpu.timing("cosformer", False, lengths[-1], device, bsz, profile=False)
    finally:
        cosformer_module._state_chunks = chunks
    print(f"profiled ({time.time() - started:.0f} s)", flush=True)
    dev = torch.device(device)
    decode_step_gpu.warm_up(dev, 1.0)
    result["decode"] = [decode_step_gpu.run(n, contexts, dev, slow=3.0) for n in ("vanilla", "cosformer", "vanilla")]
    (args.out / "cosformer_gpu.json").write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{result['device']}, torch {result['torch']}")
    print("\ncheck vs float64 (max error / max reference; FAIL above 1e-3 fp32, 6e-2 bf16)")
    for r in result["check"]:
        print(
            f"  {'causal ' if r['causal'] else 'noncaus'} {r['dtype']} {'pad' if r['padding'] else '   '} "
            f"out {r['rel_out']:.1e} grad {r['rel_grad']:.1e} {'ok' if r['ok'] else 'FAIL'}"
        )
    sdpa = {(r["causal"], r["length"]): r for r in rows if r["mechanism"] == "vanilla"}
    print("\nfwd+bwd ms, SDPA/ours, peak MB, SDPA/ours, kernels, GPU-busy ms")
    for r in rows:
        base = sdpa[r["causal"], r["length"]]
        ms, mb = r.get("ms"), r.get("peak_mb")
        ratio = f"{base['ms'] / ms:5.2f}" if ms and base.get("ms") else "    -"
        mratio = f"{base['peak_mb'] / mb:5.2f}" if mb and base.get("peak_mb") else "    -"
        print(
            f"  {r['mechanism']:9s} {'causal ' if r['causal'] else 'noncaus'} {r['length']:6d} "
            f"{ms if ms is None else round(ms, 2)!s:>7} {ratio} {mb if mb is None else round(mb)!s:>6} {mratio} "
            f"{r.get('kernels', '-')!s:>4} {r.get('gpu_ms', '-') if r.get('gpu_ms') is None else round(r['gpu_ms'], 2)}"
        )
    print(f"  noncausal {lengths[-1]} with unsplit state reductions: {result['unsplit'].get('ms')} ms")
    for causal, top in result["top"].items():
        print(f"\ncosformer {'causal' if causal else 'noncausal'} {lengths[-1]}: top CUDA kernels (ms, calls)")
        for name, ms, calls in top:
            print(f"  {ms:7.3f} {calls:3d}  {name}")
    print("\ndecoding step, ms (second vanilla row: the same step again after cosFormer)")
    print(decode_step_gpu.table(result["decode"], list(contexts)))
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
