"""S4D's training path on the GPU: checked against float64, timed against SDPA (``vanilla``) in the same run.

Setting (CAB's efficiency benchmark, issue 13): self attention on ``(L, B=4, 512)``, 8 heads of 64, fp32
modules under bf16 autocast, train mode, dropout 0, forward + backward of ``out.sum()``, projections
included; noncausal (bidirectional kernel, FFT convolution) and causal (exact chunked scan).

1. Check, at L = 300 with key padding: the float64 module on the device, in its long-sequence path (FFT in
   batch slices; causal: parameter gradients by the scan), equals the float64 module on the CPU in its short
   path (which the test suite checks against the definition), output and every gradient; the fp32 and the
   bf16-autocast modules against that float64 output and input gradient (relative max error); a causal
   gradient from the first half is exactly zero on the second half.
2. Time (median of CUDA-event timings), peak memory above what was allocated before the call
   (``torch.cuda.max_memory_allocated``) and ATen ops per forward + backward, at L = 1k, 8k, 32k (``--lengths``),
   for S4D and SDPA, and at the longest length S4D with its FFT never split over the batch (``_FFT_CHUNK_BYTES``
   unbounded), to show what the memory bound costs, and causal S4D with its parameter gradients by the FFT at
   every length (``s4d-fft-grads``: where the switch to the scan's should be).  CAB's S4D times (session-3
   H200 run, same setting) are printed beside for the "never slower than CAB" target.

    python benchmarks/s4d_gpu.py --out DIR                  # about 30 s on an H200
    python benchmarks/s4d_gpu.py --out DIR --device cpu --lengths 256 --reps 1   # smoke run

Writes ``DIR/s4d_gpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention import build_attention  # noqa: E402
from efficient_attention.attentions import s4d as s4d_module  # noqa: E402

EMBED, HEADS, BSZ = 512, 8, 4
TARGETS = (
    "targets: faster than SDPA at <= 4k noncausal and <= 8k causal; <= SDPA causal / 3 at 32k; memory <= SDPA's "
    "from 8k; never slower than CAB"
)
# CAB's S4D fwd+bwd ms on the H200 in this setting (session 3's run, in benchmarks/results/h200/)
CAB_MS = {
    (False, 1024): 5.32,
    (False, 8192): 21.6,
    (False, 32768): 92.1,
    (True, 1024): 3.97,
    (True, 8192): 20.2,
    (True, 32768): 87.4,
}


def build(name, causal, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return build_attention(name, embed_dim=EMBED, num_heads=HEADS, causal=causal, dropout=0.0).to(device, dtype)


def _run(m, x, kpm=None, autocast=False):
    """Output and gradients (input, then parameters by name) of ``(out masked).pow(2).sum()``."""
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out, _ = m(x, key_padding_mask=kpm, need_weights=False)
    out = out.float() if autocast else out
    if kpm is not None:
        out = out.masked_fill(kpm.t()[..., None], 0.0)
    out.pow(2).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    return out.detach(), grads


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def check(device, length=300):
    rows = []
    g = torch.Generator().manual_seed(1)
    x = torch.randn(length, 2, EMBED, generator=g, dtype=torch.float64)
    kpm = torch.zeros(2, length, dtype=torch.bool)
    kpm[1, -7:] = True
    for causal in (False, True):
        ref_out, ref_grads = _run(build("s4d", causal, "cpu", torch.float64).train(), x, kpm)
        # the device in the long-sequence path (batch-sliced FFT; causal: the parameter gradients by the scan)
        bound, s4d_module._FFT_CHUNK_BYTES = s4d_module._FFT_CHUNK_BYTES, 1
        try:
            dev64_out, dev64_grads = _run(
                build("s4d", causal, device, torch.float64).train(), x.to(device), kpm.to(device)
            )
        finally:
            s4d_module._FFT_CHUNK_BYTES = bound
        err64 = max([_rel(dev64_out, ref_out)] + [_rel(dev64_grads[k], ref_grads[k]) for k in ref_grads])
        m32 = build("s4d", causal, device).train()
        out32, g32 = _run(m32, x.float().to(device), kpm.to(device))
        err32 = max(_rel(out32, ref_out), _rel(g32["input"], ref_grads["input"]))
        out16, g16 = _run(m32, x.float().to(device), kpm.to(device), autocast=True)
        err16 = max(_rel(out16, ref_out), _rel(g16["input"], ref_grads["input"]))
        row = dict(causal=causal, fp64_vs_cpu=err64, fp32_vs_fp64=err32, bf16_autocast_vs_fp64=err16)
        row["ok"] = err64 < 1e-9 and err32 < 1e-4 and err16 < 5e-2
        if causal:  # exact causality of the input gradient on the device (fp32)
            xi = x.float().to(device).requires_grad_(True)
            out, _ = m32(xi, need_weights=False)
            out[: length // 2].sum().backward()
            row["future_grad_exactly_zero"] = bool(torch.all(xi.grad[length // 2 :] == 0).item())
            row["ok"] = row["ok"] and row["future_grad_exactly_zero"]
        rows.append(row)
        print("check", {k: (f"{v:.1e}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def fwd_bwd(m, x):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out, _ = m(x, need_weights=False)
    out.float().sum().backward()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(name, causal, length, reps, device):
    m = build(name, causal, device).train()
    x = torch.randn(length, BSZ, EMBED, device=device, requires_grad=True)
    try:
        fwd_bwd(m, x)  # warm-up (lazy initialisation, cuFFT plans)
        fwd_bwd(m, x)
        with _CountOps() as ops:
            fwd_bwd(m, x)
        _sync(device)
        peak = float("nan")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd(m, x)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        times = []
        for _ in range(reps):
            m.zero_grad(set_to_none=True)
            x.grad = None
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fwd_bwd(m, x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fwd_bwd(m, x)
                times.append(1e3 * (time.perf_counter() - t0))
        times.sort()
        return dict(ms=times[len(times) // 2], peak_gib=peak, aten_ops=ops.count)
    except torch.cuda.OutOfMemoryError:
        return dict(ms=float("nan"), peak_gib=float("nan"), aten_ops=0, error="out of memory")
    finally:
        del m, x
        if device == "cuda":
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    dev = args.device
    result = dict(
        device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        host=platform.node(),
        setting=dict(batch=BSZ, embed=EMBED, heads=HEADS, autocast="bf16", mode="forward+backward"),
        check=check(dev),
        timings=[],
    )
    series = [("vanilla", False), ("s4d", False), ("s4d-unsplit-fft", False)]
    series += [("vanilla", True), ("s4d", True), ("s4d-fft-grads", True), ("s4d-unsplit-fft", True)]
    bound = s4d_module._FFT_CHUNK_BYTES
    for length in args.lengths:
        for name, causal in series:
            if name == "s4d-unsplit-fft" and length != max(args.lengths):
                continue
            if name == "s4d-unsplit-fft":  # one FFT over the whole batch: what the memory bound costs
                s4d_module._FFT_CHUNK_BYTES = 1 << 62
            by_scan = s4d_module._param_grads_by_scan
            if name == "s4d-fft-grads":  # causal parameter gradients by the FFT at every length (for the switch)
                s4d_module._param_grads_by_scan = lambda *args: False
            try:
                r = time_case(name.split("-")[0], causal, length, args.reps, dev)
            finally:
                s4d_module._FFT_CHUNK_BYTES = bound
                s4d_module._param_grads_by_scan = by_scan
            result["timings"].append(dict(name=name, causal=causal, length=length, **r))
            print(f"{name:16s} {'causal' if causal else 'noncausal':9s} L={length:6d} {r}", flush=True)
    result["elapsed_s"] = time.time() - t0
    with open(os.path.join(args.out, "s4d_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n{result['device']}, torch {result['torch']}: fwd+bwd ms / peak GiB / ATen ops, B={BSZ}, bf16 autocast")
    print(f"{'series':26s}" + "".join(f"{f'L={n}':>24s}" for n in args.lengths))
    for name, causal in series:
        cells = []
        for n in args.lengths:
            r = next(
                (t for t in result["timings"] if t["name"] == name and t["causal"] == causal and t["length"] == n), None
            )
            cells.append("-" if r is None else f"{r['ms']:7.2f} {r['peak_gib']:5.2f} {r['aten_ops']:5d}")
        print(f"{name + (' causal' if causal else ' noncausal'):26s}" + "".join(f"{c:>24s}" for c in cells))
    for causal in (False, True):
        ratios = []
        for n in args.lengths:
            mine = next(
                t for t in result["timings"] if t["name"] == "s4d" and t["causal"] == causal and t["length"] == n
            )
            sdpa = next(
                t for t in result["timings"] if t["name"] == "vanilla" and t["causal"] == causal and t["length"] == n
            )
            cab = CAB_MS.get((causal, n))
            ratios.append(
                f"L={n}: SDPA/s4d {sdpa['ms'] / mine['ms']:.2f}x time, {sdpa['peak_gib'] / mine['peak_gib']:.2f}x mem"
                + (f", CAB/s4d {cab / mine['ms']:.2f}x time" if cab else "")
            )
        print(f"{'causal' if causal else 'noncausal'} (above 1: s4d better): " + "; ".join(ratios))
    print(TARGETS)
    print(f"check: {'all ok' if all(r['ok'] for r in result['check']) else 'FAILURES'}; {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
