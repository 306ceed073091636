"""How much of a mechanism's training step is the host's: eager against CUDA-graph replay, beside SDPA.

Below 8k tokens CAB's setting (self-attention on ``(L, B=4, 512)``, 8 heads of 64, bf16 autocast, forward +
backward) is bound by the host on an H200: Python, autograd and ATen dispatch cost ~20 us an op, so a step's
time follows its op count (``benchmarks/host_ops.py``: SDPA's module runs 85 ops, the causal linear family
125-300) whatever the GPU does.  This script measures both sides in one process per case:

* ``eager_ms``: the step as a training loop runs it (median of ``--repeats`` steps from an idle GPU);
* ``graph_ms``: the same step captured once in a CUDA graph and replayed (``kernels_gpu.graph_ms``: median of
  ``triton.testing.do_bench``): the GPU's time alone, which is what ``torch.compile(mode="reduce-overhead")``
  or ``torch.cuda.make_graphed_callables`` give a user who captures the layer.  Causal ProbSparse, which sizes
  its active rows on the host when eager, attends every row while captured (its replayed time is dense cost); a
  step that cannot be captured records the error.

Ratios are against ``vanilla`` (SDPA) of the same run and pattern, eager to eager and graph to graph.

    python benchmarks/graphs_gpu.py --out DIR [--mechanisms performer abc s4d] [--lengths 1024 4096 8192]
    python benchmarks/graphs_gpu.py --smoke --out DIR     # CPU, tiny, eager only: checks the script

Writes ``DIR/graphs_gpu.json`` and prints a table.  Each (mechanism, pattern) runs in its own process (a failed
capture can leave the CUDA context unusable).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

CASES = [
    ("vanilla", "noncausal"),
    ("performer", "noncausal"),
    ("cosformer", "noncausal"),
    ("abc", "noncausal"),
    ("lara", "noncausal"),
    ("nystrom", "noncausal"),
    ("s4d", "noncausal"),
    ("vanilla", "causal"),
    ("performer", "causal"),
    ("cosformer", "causal"),
    ("abc", "causal"),
    ("s4d", "causal"),
    ("probsparse", "causal"),
]


def _median_ms(fn, sync, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_case(name: str, pattern: str, lengths: list, repeats: int, smoke: bool) -> list:
    """Eager and graph-replay ms of one mechanism's training step at each length (one process)."""
    import torch

    from efficient_attention import build_attention

    device = torch.device("cpu" if smoke else "cuda")
    embed, heads, batch = (32, 2, 2) if smoke else (512, 8, 4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        m = build_attention(name, embed_dim=embed, num_heads=heads, causal=pattern == "causal", self_attention=True)
        m = m.to(device).train()
        x = torch.randn(length, batch, embed, device=device, requires_grad=True)
        leaves = [x, *m.parameters()]
        dtype = torch.bfloat16

        def step():  # (no autocast cache: a captured step must cast the weights itself every replay)
            with torch.autocast(device.type, dtype=dtype, enabled=not smoke, cache_enabled=False):
                out, _ = m(x, x, x, need_weights=False)
            out.float().sum().backward()

        def fresh():
            for t in leaves:
                t.grad = None
            step()

        row = dict(mechanism=name, pattern=pattern, length=length)
        try:
            for _ in range(3):
                fresh()
            row["eager_ms"] = _median_ms(fresh, sync, repeats)
        except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
            row["error"] = f"eager: {type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            continue
        if not smoke:
            from kernels_gpu import graph_ms  # (capture after warm-up on a side stream, replays timed by do_bench)

            try:
                row["graph_ms"] = graph_ms(step, leaves)
            except Exception as exc:  # noqa: BLE001 -- a step that syncs with the host cannot be captured
                row["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _table(rows: list) -> str:
    base = {(r["pattern"], r["length"]): r for r in rows if r["mechanism"] == "vanilla"}
    lengths = sorted({r["length"] for r in rows})
    lines = [
        "cell: eager ms (SDPA/ours) | graph ms (SDPA/ours); > 1: ours faster",
        "mechanism   pattern    " + "".join(f"{n:>34}" for n in lengths),
    ]
    for key in dict.fromkeys((r["mechanism"], r["pattern"]) for r in rows):
        cells = []
        for n in lengths:
            r = next((r for r in rows if (r["mechanism"], r["pattern"], r["length"]) == (*key, n)), None)
            b = base.get((key[1], n), {})
            if r is None or "eager_ms" not in r:
                cells.append(f"{'-' if r is None else 'error':>34}")
                continue
            e = f"{r['eager_ms']:6.2f} ({b.get('eager_ms', float('nan')) / r['eager_ms']:4.2f})"
            g = (
                "no capture"
                if "graph_ms" not in r
                else f"{r['graph_ms']:6.2f} ({b.get('graph_ms', float('nan')) / r['graph_ms']:4.2f})"
            )
            cells.append(f"{e} | {g:>15}".rjust(34))
        lines.append(f"{key[0]:<11} {key[1]:<10}" + "".join(cells))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mechanisms", nargs="+", help="only these (vanilla is always added)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, eager only: checks the script")
    p.add_argument("--one", nargs=2, metavar=("NAME", "PATTERN"), help="one case, in this process")
    args = p.parse_args()
    if args.smoke:
        args.lengths, args.repeats = [16, 24], 2
    if args.one:
        for row in run_case(*args.one, args.lengths, args.repeats, args.smoke):
            if "eager_ms" not in row:
                print(json.dumps(row), flush=True)
        return 0
    cases = [c for c in CASES if not args.mechanisms or c[0] in args.mechanisms or c[0] == "vanilla"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for name, pattern in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--out", str(args.out), "--one", name, pattern]
        cmd += ["--lengths", *map(str, args.lengths), "--repeats", str(args.repeats)] + (
            ["--smoke"] if args.smoke else []
        )
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        got = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode != 0 and not got:
            got = [
                dict(mechanism=name, pattern=pattern, length=0, error=(run.stderr.strip().splitlines() or ["?"])[-1])
            ]
        rows += got
        print(f"[{time.time() - t0:5.0f}s] {name} {pattern}: {len(got)} rows", flush=True)
    import torch

    info = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__)
    (args.out / "graphs_gpu.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
