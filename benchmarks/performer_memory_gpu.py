"""Performer against SDPA in CAB's setting: errors against float64, step time and peak memory (both patterns).

The measurements are ``memory_gpu.py``'s (``check``: max abs error of the output and of ``x``'s gradient against
the float64 module at L = 256 and 2048, where the noncausal products split the length on CUDA; ``train_point``:
median ms of a bf16-autocast training step and its peak MiB over the inputs and weights), for ``performer`` and
``vanilla`` at 8k, 16k and 32k tokens.

    python benchmarks/performer_memory_gpu.py --out DIR

Writes ``DIR/performer_memory_gpu.json`` and prints the table.  Under a minute on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from memory_gpu import LENGTHS, check, train_point  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    results: dict = {}
    for causal in (False, True):
        pattern = "causal" if causal else "noncausal"
        err = {n: check("performer", causal, device, n) for n in (256, 2048)}
        print(f"performer {pattern} err (out, grad) fp32 / bf16: {err}", flush=True)
        results[f"performer {pattern} err"] = err
        for length in LENGTHS:
            ours, sdpa = (train_point(name, causal, length, device) for name in ("performer", "vanilla"))
            ratio = sdpa["peak_mib"] / ours["peak_mib"]
            print(
                f"{pattern:9s} L={length:6d} performer {ours['ms']:7.2f} ms {ours['peak_mib']:8.1f} MiB | vanilla "
                f"{sdpa['ms']:7.2f} ms {sdpa['peak_mib']:8.1f} MiB | x sdpa {ratio:.2f}",
                flush=True,
            )
            results[f"{pattern} {length}"] = {"performer": ours, "vanilla": sdpa}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "performer_memory_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
