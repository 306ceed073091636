"""Which shapes the Triton kernels that make cosFormer's features inside them (``FEAT``) get right, per dtype.

Session 8 found the bf16 kernels wrong at head dim 32 on an H200 (0.5 relative error, an illegal memory access at
5k positions) while fp32 with the same tiles and bf16 at head dim 64 matched float64
(``results/h200/session8/cosformer_fused_diag.txt``).  Session 9 ran this script with ``--config`` overrides: the
failures came from one launch config (chunks of 64, 4 warps, value tiles below 64), which
``linear_attention._config`` no longer gives the ``FEAT`` kernels in half precision, and every head dim 16-128
then matched (``results/h200/session9/cosformer_fused_check_267605e.*``).  Run it after a change to
``kernels/_triton_linear.py`` or to the launch configs: for every (length, head dim, dtype, activation) it
runs ``LinearTriton.run_fused(..., cos_sin, act)`` on raw time-first rows, forward and backward, against float64
linear attention on features built outside the kernels, each case in its own process (an illegal memory access
poisons the process's CUDA context), and prints the relative errors of ``out, dq, dk, dv``.

    python benchmarks/cosformer_fused_check_gpu.py --out DIR [--lengths 300 5000] [--dims 16 32 64 128]
    python benchmarks/cosformer_fused_check_gpu.py --one 300 32 bfloat16 0     # one case, in this process
    python benchmarks/cosformer_fused_check_gpu.py --out DIR --config BLOCK_D=64 num_warps=8   # other tiles

``--config`` overrides entries of the kernels' launch config (``linear_attention._triton_config``) for every
case: the way to find which tiles a failing shape needs.  ``--jobs`` runs that many cases at once.

Writes ``DIR/cosformer_fused_check.json``.  Needs CUDA; about 10 s a case on an H200 (mostly compilation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}


def _override(la, config: dict) -> None:
    """Makes ``la._triton_config`` return its config with ``config``'s entries replaced (``SEG`` kept a multiple
    of ``BLOCK_C``)."""
    if not config:
        return
    base = la._triton_config

    def patched(*args):
        cfg = dict(base(*args), **config)
        cfg["SEG"] = -(-cfg["SEG"] // cfg["BLOCK_C"]) * cfg["BLOCK_C"]
        return cfg

    la._triton_config = patched


def one_case(
    length: int,
    dim: int,
    dtype_name: str,
    act: int,
    device: str = "cuda",
    batch: int = 2,
    heads: int = 4,
    config: dict | None = None,
) -> dict:
    """Relative errors (``out, dq, dk, dv``) of one fused call against float64; ``dim`` is the head dim of
    ``q, k`` (``2 dim`` features) and of ``v``; ``config`` overrides launch-config entries."""
    import torch

    la = importlib.import_module("efficient_attention.kernels.linear_attention")
    _override(la, config or {})
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(length + dim)

    def heads_of(width: int):  # a time-first (T, B, H*d) projection's head view, as the module passes it
        x = torch.randn(length, batch, heads * width, generator=g, device=device)
        return x.view(length, batch, heads, width).permute(1, 2, 0, 3).to(dtype)

    q, k, v = heads_of(dim), heads_of(dim), heads_of(dim)
    theta = (torch.pi / 2) * torch.arange(length, dtype=torch.float64, device=device) / length
    cos_sin = torch.stack([theta.cos(), theta.sin()], -1)
    ins = [x.detach().requires_grad_() for x in (q, k, v)]
    out, _, _ = la.LinearTriton.run_fused(*ins, None, None, None, True, dtype, True, cos_sin.float(), act)
    weights = torch.randn(out.shape, generator=g, device=device, dtype=torch.float64)
    got = [out, *torch.autograd.grad((out * weights.to(out.dtype)).sum(), ins)]
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]

    def features(x):
        a = torch.relu(x) if act == 0 else 1.0 + torch.nn.functional.elu(x)
        return torch.cat([a * cos_sin[:, :1], a * cos_sin[:, 1:]], -1)

    want_out = la.linear_attention(features(ref[0]), features(ref[1]), ref[2], causal=True, backend="reference")
    want = [want_out, *torch.autograd.grad((want_out * weights).sum(), ref)]
    errors = [((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, want)]
    used = la._config(q, 2 * dim, dim)
    return dict(
        errors=dict(zip(("out", "dq", "dk", "dv"), errors)), ok=max(errors) < TOLERANCE[dtype_name], config=used
    )


def _config_arg(items: list) -> dict:
    config = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"--config takes KEY=INT entries, got {item!r}")
        config[key] = int(value)
    return config


def _run_case(case: dict, device: str, config_items: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", device, "--one", str(case["length"])]
    cmd += [str(case["dim"]), case["dtype"], str(case["act"])]
    if config_items:
        cmd += ["--config", *config_items]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    case = dict(case)
    if run.returncode == 0 and lines:
        case.update(json.loads(lines[-1]))
    else:
        case.update(ok=False, error=(run.stderr.strip().splitlines() or ["no output"])[-1][:200])
    return case


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--lengths", type=int, nargs="+", default=[300, 5000])
    p.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--acts", type=int, nargs="+", default=[0], help="0: relu, 1: 1 + elu")
    p.add_argument("--one", nargs=4, metavar=("LENGTH", "DIM", "DTYPE", "ACT"), help="one case, in this process")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1 (fp32 only)")
    p.add_argument("--config", nargs="+", metavar="KEY=INT", help="launch-config overrides (BLOCK_D=64 num_warps=8)")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (each its own process)")
    args = p.parse_args()
    config = _config_arg(args.config)
    if args.one:
        length, dim, dtype_name, act = args.one
        print(json.dumps(one_case(int(length), int(dim), dtype_name, int(act), args.device, config=config)))
        return 0
    if args.out is None:
        p.error("--out is needed (or --one)")
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [
        dict(length=length, dim=dim, dtype=dtype_name, act=act)
        for length in args.lengths
        for dim in args.dims
        for dtype_name in args.dtypes
        for act in args.acts
    ]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda c: _run_case(c, args.device, args.config), cases))
    for case in rows:
        body = case.get("error") or " ".join(f"{k} {e:.1e}" for k, e in case["errors"].items())
        tiles = " ".join(f"{k}={v}" for k, v in case.get("config", {}).items())
        print(
            f"{'ok  ' if case['ok'] else 'FAIL'} T={case['length']} d={case['dim']} {case['dtype']} "
            f"act={case['act']}: {body}  [{tiles}]"
        )
    import torch

    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    info = dict(device=name, torch=torch.__version__, config_overrides=config)
    (args.out / "cosformer_fused_check.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
