"""The costliest CUDA kernels of one training step, for several mechanisms at once (CAB's setting).

For each ``name:pattern`` it runs the benchmark's step (``efficient_attention/benchmark/timing.py``'s ``train_case``:
self attention on ``(L, B=4, 512)``, 8 heads of 64, bf16 autocast, forward + backward) three times, profiles a
fourth, and prints the step's summed kernel time, its kernel count and the ten kernels with the most self time.
A generic ``elementwise_kernel<128, 4>`` high in the list is usually a copy or a broadcast product in a layout
TensorIterator cannot vectorise; an ``sm80_xmma_gemm_f32`` with 32x32 tiles, a product reducing over the whole
length with one tile per (batch, head): the two kinds of hotspot session 11 found this way.

    python benchmarks/kernel_profile_gpu.py 8192 cosformer:noncausal abc:causal ...

Needs CUDA.  About ten seconds a case on an H200.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficient_attention import build_attention  # noqa: E402
from efficient_attention.benchmark.timing import train_case  # noqa: E402


def profile_case(case: str, length: int) -> None:
    name, _, pattern = case.partition(":")
    m = build_attention(name, embed_dim=512, num_heads=8, causal=pattern == "causal", self_attention=True).cuda()
    call, reset = train_case(m, length, 4, 512, torch.device("cuda"), torch.bfloat16)
    for _ in range(3):
        call()
        reset()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        reset()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"== {case} L={length}: GPU {total:.3f} ms in {sum(e.count for e in events)} kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:10]:
        print(f"   {e.self_device_time_total / 1e3:7.3f} ms x{e.count:<3d} {e.key[:150]}")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    length = int(sys.argv[1])
    for case in sys.argv[2:]:
        try:
            profile_case(case, length)
        except Exception as exc:  # noqa: BLE001 - one case's failure must not stop the others
            print(f"== {case}: {type(exc).__name__}: {exc}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
