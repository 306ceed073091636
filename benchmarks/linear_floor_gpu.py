"""The short-length floor of the linear family, S4D, LARA and Nystrom on CUDA: correctness, time, memory, kernels.

For Performer, cosFormer, ABC (causal and noncausal), S4D (causal and noncausal), LARA and Nystrom:

1. ``check``: the module on CUDA (fp32, and bf16 autocast) against the same module in float64 on the CPU,
   output and input gradient, eval mode, with and without key padding; reported as the largest error over the
   largest reference value (``rel``), flagged ``FAIL`` above 1e-3 (fp32) / 6e-2 (bf16);
2. ``time``: CAB's efficiency setting (self-attention on ``(L, B=4, 512)``, 8 heads of 64, bf16 autocast, train
   mode, forward + backward of ``loss = out.sum()``), L in 1k, 4k, 8k, 32k, median of 5 CUDA-event timed steps
   after 2 warm-up steps, peak memory above the inputs, against ``vanilla`` (SDPA) with the same pattern;
3. ``kernels``: CUDA kernels launched by one step (``torch.profiler``) at 1k and 8k, with the GPU-busy time.

    python benchmarks/linear_floor_gpu.py --out DIR          # < 2 minutes on an H200
    python benchmarks/linear_floor_gpu.py --out DIR --smoke  # tiny CPU run of the same code (no GPU)

Writes ``DIR/linear_floor.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficient_attention import build_attention  # noqa: E402

CASES = [
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
]
LENGTHS = (1024, 4096, 8192, 32768)
TOL = {"fp32": 1e-3, "bf16": 6e-2}


def _module(name, causal, embed, heads, device, dtype=torch.float32):
    torch.manual_seed(0)
    return build_attention(name, embed_dim=embed, num_heads=heads, causal=causal, self_attention=True).to(device, dtype)


def check(name: str, causal: bool, device: str) -> list:
    rows = []
    embed, heads, length, bsz = 256, 4, 333, 2
    ref = _module(name, causal, embed, heads, "cpu", torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(length, bsz, embed, generator=g, dtype=torch.float64)
    pads = [None]
    if name != "s4d" or not causal:
        kpm = torch.zeros(bsz, length, dtype=torch.bool)
        kpm[1, -37:] = True
        pads.append(kpm)
    for kpm in pads:
        x = x64.clone().requires_grad_(True)
        want, _ = ref(x, key_padding_mask=kpm, need_weights=False)
        want.sum().backward()
        want_grad = x.grad
        for label in ("fp32", "bf16"):
            mod = _module(name, causal, embed, heads, device).eval()
            mod.load_state_dict(ref.state_dict())
            xd = x64.to(device, torch.float32).requires_grad_(True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=label == "bf16"):
                out, _ = mod(xd, key_padding_mask=None if kpm is None else kpm.to(device), need_weights=False)
            out.float().sum().backward()
            err_o = (out.double().cpu() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
            err_g = (xd.grad.double().cpu() - want_grad).abs().max().item() / max(want_grad.abs().max().item(), 1e-30)
            rows.append(
                {
                    "mechanism": name,
                    "causal": causal,
                    "dtype": label,
                    "padding": kpm is not None,
                    "rel_out": err_o,
                    "rel_grad": err_g,
                    "ok": max(err_o, err_g) <= TOL[label],
                }
            )
    return rows


def _step_fn(mod, x, device):
    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            out, _ = mod(x, need_weights=False)
        out.float().sum().backward()

    return step


def timing(name: str, causal: bool, length: int, device: str, bsz: int, profile: bool) -> dict:
    mod = _module(name, causal, 512, 8, device).train()
    x = torch.randn(length, bsz, 512, device=device, requires_grad=True)
    step = _step_fn(mod, x, device)
    row = {"mechanism": name, "causal": causal, "length": length}
    try:
        for _ in range(2):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(5):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        row["ms"] = sorted(times)[len(times) // 2]
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
        if profile:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
            kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            row["kernels"] = len(kern)
            row["gpu_ms"] = sum(e.device_time for e in kern) / 1000.0
            row["aten_ops"] = sum(
                1
                for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")
            )
    except torch.cuda.OutOfMemoryError:
        row["ms"] = None
        row["error"] = "OOM"
    del mod, x
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


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
    bsz = 1 if args.smoke else 4
    started = time.time()
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "check": [],
        "time": [],
    }
    for name, causal in CASES:
        result["check"] += check(name, causal, device)
    print(f"checks done in {time.time() - started:.0f} s", flush=True)
    for name, causal in [("vanilla", True), ("vanilla", False)] + CASES:
        for length in lengths:
            result["time"].append(timing(name, causal, length, device, bsz, profile=length in (lengths[0], 8192)))
        print(f"{name} {'causal' if causal else 'noncausal'} timed ({time.time() - started:.0f} s)", flush=True)
    (args.out / "linear_floor.json").write_text(json.dumps(result, indent=1))

    print(f"\n{result['device']}, torch {result['torch']}")
    print("\ncheck vs float64 (max error / max reference; FAIL above 1e-3 fp32, 6e-2 bf16)")
    for r in result["check"]:
        print(
            f"  {r['mechanism']:10s} {'causal' if r['causal'] else 'noncaus':7s} {r['dtype']} "
            f"{'pad' if r['padding'] else '   '} out {r['rel_out']:.1e} grad {r['rel_grad']:.1e} "
            f"{'ok' if r['ok'] else 'FAIL'}"
        )
    sdpa = {(r["causal"], r["length"]): r for r in result["time"] if r["mechanism"] == "vanilla"}
    print("\nfwd+bwd ms (SDPA / ours), peak MB (ours / SDPA), kernels and GPU-busy ms per step")
    print(
        f"  {'mechanism':10s} {'pattern':7s} {'L':>6s} {'ms':>8s} {'x SDPA':>7s} {'MB':>8s} {'/SDPA':>6s} "
        f"{'kern':>5s} {'busy':>6s}"
    )

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in result["time"]:
        base = sdpa.get((r["causal"], r["length"]), {})
        ms, bms = r.get("ms"), base.get("ms")
        mb, bmb = r.get("peak_mb"), base.get("peak_mb")
        pattern = "causal" if r["causal"] else "noncaus"
        shown = fmt(ms, "8.2f") if ms else r.get("error", "-")
        print(
            f"  {r['mechanism']:10s} {pattern:7s} {r['length']:6d} {shown:>8} "
            f"{fmt(bms / ms if ms and bms else None, '7.2f'):>7} {fmt(mb, '8.0f'):>8} "
            f"{fmt(mb / bmb if mb and bmb else None, '6.2f'):>6} {fmt(r.get('kernels'), 'd'):>5} "
            f"{fmt(r.get('gpu_ms'), '6.2f'):>6}"
        )
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
