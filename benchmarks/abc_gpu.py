"""ABC on the GPU (issue 13 / 14 targets): checked against float64, timed against SDPA, decoding step vs vanilla's.

    PYTHONPATH=$PWD python benchmarks/abc_gpu.py --out DIR [--budget 85]   # H200: about a minute

One process, most important first, a line printed after every case (past ``--budget`` seconds the rest are
recorded as skipped):

* ``train`` -- CAB's efficiency setting: self attention on ``(L, B=4, 512)``, 8 heads of 64, fp32 weights under
  bf16 autocast, train mode, ``loss = out.sum()``, forward + backward, projections included
  (:mod:`efficient_attention.benchmark.timing`), L in 1k, 8k, 16k, 32k: ABC noncausal and causal, SDPA
  (``vanilla``) noncausal and causal, and ``abc nc sdpa``: ABC noncausal with its slot read through SDPA as it was
  before (what the hand-written read gains); median ms and peak GiB (on top of what was live);
* ``check`` -- the module in fp32 and under bf16 autocast against the same weights in float64 on the GPU, B = 2,
  L = 300 (noncausal with 8 padded keys in row 1) and L = 2048 (causal: the fresh path on the kernels):
  max |out - ref| / max |ref| and the same for the worst gradient (input and every parameter);
* ``decode`` -- one decoding step of one layer (B = 4, bf16 autocast) at contexts 512 and 8k, ABC against
  vanilla's cached step (``benchmarks/decode_step_gpu.py``'s harness: its ``err`` / ``err_bf16`` check decoding
  against the full pass), and the ATen ops of the step.

Writes ``DIR/abc_gpu.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from efficient_attention.attentions.abc import ABC  # noqa: E402
from efficient_attention.benchmark import timing  # noqa: E402
from efficient_attention.registry import get_attention_class  # noqa: E402

EMBED, HEADS, BATCH = 512, 8, 4
LENGTHS = (1024, 8192, 16384, 32768)
CASES = [  # (label, mechanism, causal)
    ("vanilla nc", "vanilla", False),
    ("abc nc", "abc", False),
    ("abc nc sdpa", "abc", False),
    ("vanilla c", "vanilla", True),
    ("abc c", "abc", True),
]


def _sdpa_read(self, q, mem_k, mem_v):
    """ABC's noncausal slot read as it was before this change (SDPA), for the comparison row."""
    dropout = self.dropout_p if self.training else 0.0
    return F.scaled_dot_product_attention(q, mem_k, mem_v, dropout_p=dropout, scale=self.scaling)


def build(name: str, causal: bool, device, dtype=torch.float32):
    torch.manual_seed(0)
    return get_attention_class(name)(EMBED, HEADS, self_attention=True, causal=causal).to(device=device, dtype=dtype)


def _fwd_bwd(m, x, kpm, autocast: bool):
    x = x.detach().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float64).view_as(out)
    (out.double() * weight).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in m.parameters() if p.grad is not None]


def check(causal: bool, device, length: int) -> dict:
    bsz, kpm = 2, None
    if not causal:
        kpm = torch.zeros(bsz, length, dtype=torch.bool, device=device)
        kpm[1, -8:] = True
    ref_m = build("abc", causal, device, torch.float64).eval()
    x = torch.randn(length, bsz, EMBED, device=device, dtype=torch.float64)
    ref, ref_g = _fwd_bwd(ref_m, x, kpm, False)
    res = {}
    for key, autocast in (("fp32", False), ("bf16", True)):
        m = build("abc", causal, device).eval()
        m.load_state_dict({k: v.float() for k, v in ref_m.state_dict().items()})
        out, grads = _fwd_bwd(m, x.float(), kpm, autocast)
        keep = slice(None) if kpm is None else ~kpm.t()  # padded rows: no output to compare
        err = float((out.double() - ref)[keep].abs().max() / ref[keep].abs().max())
        floor = 1e-3 * max(float(r.abs().max()) for r in ref_g)  # a gradient that is ~0 exactly (k's bias)
        gerr = max(float((g.double() - r).abs().max()) / max(float(r.abs().max()), floor) for g, r in zip(grads, ref_g))
        res[key] = (err, gerr)
    return res


def train(label: str, name: str, causal: bool, length: int, device) -> dict:
    m = build(name, causal, device)
    saved = ABC._read
    if label.endswith("sdpa"):
        ABC._read = _sdpa_read  # type: ignore[method-assign]
    try:
        call, reset = timing.train_case(m, length, BATCH, EMBED, device, torch.bfloat16)
        out = timing.run_timed(call, reset, device, warmup=3, repeats=10, budget=2.0)
        out.update(timing.peak_bytes(call, reset, device))
    finally:
        ABC._read = saved  # type: ignore[method-assign]
    return {"ms": out["time_s"] * 1e3, "gib": out.get("mem_peak_bytes", 0) / 2**30}


def decode(device) -> dict:
    spec = importlib.util.spec_from_file_location("decode_step_gpu", ROOT / "benchmarks" / "decode_step_gpu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = {name: mod.run(name, (512, 8192), device, 3.0) for name in ("vanilla", "abc")}
    return {
        name: {"ms": r["ms"], "ops": r.get("ops"), "err": r.get("err"), "err_bf16": r.get("err_bf16")}
        for name, r in rows.items()
    }


def _step(result: dict, part: str, key: str, fn, t0: float, budget: float) -> None:
    """Run one case into ``result[part][key]`` (a failure or the budget is recorded, not raised) and print a line."""
    if time.perf_counter() - t0 > budget:
        result[part][key] = f"skipped: past the {budget:.0f} s budget"
        return
    t1 = time.perf_counter()
    try:
        result[part][key] = fn()
    except Exception as exc:  # noqa: BLE001 - a failure is data
        traceback.print_exc()
        result[part][key] = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(f"[{time.perf_counter() - t0:5.1f} s] {part} {key}: {result[part][key]} ({time.perf_counter() - t1:.1f} s)")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=85.0, help="seconds after which the remaining cases are skipped")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    args = p.parse_args()
    device = torch.device(args.device)
    lengths = tuple(args.lengths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result: dict = {"device": device_name, "torch": torch.__version__, "check": {}, "train": {}, "decode": {}}
    for label, causal, length in (("nc", False, 300), ("c", True, 2048)):
        _step(result, "check", f"abc {label}@{length}", lambda: check(causal, device, length), t0, args.budget)
    _step(result, "decode", "512/8k", lambda: decode(device), t0, args.budget)
    for length in lengths:
        for label, name, causal in CASES:
            run = lambda: train(label, name, causal, length, device)  # noqa: E731
            _step(result, "train", f"{label}@{length}", run, t0, args.budget)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t0
    (out / "abc_gpu.json").write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{result['device']}, torch {torch.__version__}, {result['seconds']:.0f} s")
    for k, v in result["check"].items():
        cell = " ".join(f"{d} {e[0]:.1e}/{e[1]:.1e}" for d, e in v.items()) if isinstance(v, dict) else v
        print(f"check {k} (max err / max |ref|, out / worst grad): {cell}")
    print("| case | " + " | ".join(f"{n} ms (GiB)" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for label, _, _ in CASES:
        cells = []
        for n in lengths:
            r = result["train"].get(f"{label}@{n}", "-")
            cells.append(f"{r['ms']:.2f} ({r['gib']:.2f})" if isinstance(r, dict) else str(r)[:40])
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"decode (ms per step, ATen ops (views), err vs full pass fp32 / bf16): {result['decode']}")


if __name__ == "__main__":
    main()
