"""Every kernel backend forced on CUDA, for every op, against the float64 reference (under a minute on an H200).

For each op (sliding window, block-sparse BlockMask, causal linear attention, landmark) and input dtype:

1. every backend name of the op's dispatcher is forced with ``backend=``: the ones that can run on CUDA
   (``triton``, ``chunked``, ``reference``) are compared with the float64 reference (output and the gradients
   of q, k, v, relative norm error), and timed forward+backward (eager, median of a few runs); the ones
   that cannot (``cpp`` on CUDA tensors) must raise ``BackendUnavailableError`` naming the reason;
2. the automatic choice must be ``triton``, and an input Triton cannot take (head dim 48) must fall back to
   the reference path with one WARNING;
3. each op compiles with ``torch.compile(fullgraph=True, backend="aot_eager")`` (the one autograd.Function per
   op around the registered Triton ops), forward and backward equal to eager.

    python benchmarks/backends_gpu.py --out DIR      (writes DIR/backends_gpu.json, prints a table)

``--device cpu`` is a smoke run of the script itself (N = 256; the C++ backend runs, Triton is refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention.block_mask import BlockMask  # noqa: E402
from efficient_attention.kernels import (  # noqa: E402
    BackendUnavailableError,
    block_sparse_attention,
    choose_backend,
    dispatchers,
    landmark_attention,
    linear_attention,
    sliding_window_attention,
)
from efficient_attention.local_window import LocalWindow  # noqa: E402

REL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
B, H, N, D = 2, 4, 1024, 64
DEV = "cuda"
WINDOW = LocalWindow.sliding(128, 0, causal=True)


_MASKS: dict = {}


def _mask(n: int) -> BlockMask:
    """A random per-head layout of 64-blocks with the diagonal kept (built before any compiled region)."""
    if n not in _MASKS:
        g = torch.Generator().manual_seed(0)
        nb = n // 64
        layout = (torch.rand(H, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
        _MASKS[n] = BlockMask.from_layout(layout, 64)
    return _MASKS[n]


_DECAY: dict = {}


def run_op(op: str, q, k, v, kpm, backend):
    """The output of one op's public entry (linear attention: fp32 or fp64)."""
    if op == "sliding_window":
        return sliding_window_attention(q, k, v, WINDOW, key_padding_mask=kpm, backend=backend)[0]
    if op == "block_sparse":
        return block_sparse_attention(q, k, v, _mask(q.shape[2]), causal=True, key_padding_mask=kpm, backend=backend)[0]
    if op == "linear_attention":
        decay = _DECAY[torch.float64 if q.dtype == torch.float64 else torch.float32]
        return linear_attention(
            torch.nn.functional.elu(q) + 1,
            torch.nn.functional.elu(k) + 1,
            v,
            causal=True,
            log_decay=decay,
            key_padding_mask=kpm,
            backend=backend,
        )
    return landmark_attention(q, k, v, 64, key_padding_mask=kpm, backend=backend)[0]


def params(op: str) -> dict:
    return {
        "block_sparse": dict(dropout_p=0.0, block_size=64),
        "landmark": dict(block_size=64),
        "sliding_window": dict(dropout_p=0.0, exclude_self=False),
    }.get(op, {})


def inputs(dtype, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3)]
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -37:] = True
    decay = -torch.rand(B, H, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1
    _DECAY.update({dt: decay.to(device=DEV, dtype=dt) for dt in (torch.float32, torch.float64)})
    _mask(N)
    return base, kpm.to(DEV)


def rel(got, ref) -> float:
    got, ref = got.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), fin):
        return float("inf")
    return ((got[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def forward_backward(op, base, kpm, dtype, backend):
    q, k, v = (x.to(DEV).to(dtype).requires_grad_() for x in base)
    out = run_op(op, q, k, v, kpm, backend)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEV)
    grads = torch.autograd.grad((out.double() * weight).sum(), (q, k, v))
    return out, grads, (q, k, v), weight


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(op, q, k, v, kpm, backend, weight, reps=5) -> float:
    def step():
        out = run_op(op, q, k, v, kpm, backend)
        torch.autograd.grad((out.float() * weight.float()).sum(), (q, k, v))

    step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def check_op(op: str, dtype, rows: list) -> None:
    base, kpm = inputs(dtype)
    base = [x.to(dtype).double() for x in base]  # the reference sees the same rounded inputs
    ref_out, ref_grads, *_ = forward_backward(op, base, kpm, torch.float64, "reference")
    probe = [x.to(DEV).to(dtype) for x in base]
    auto = choose_backend(op, *probe, **params(op))
    for name in dispatchers()[op].names:
        row = dict(op=op, dtype=str(dtype).replace("torch.", ""), backend=name)
        try:
            out, grads, qkv, weight = forward_backward(op, base, kpm, dtype, name)
        except BackendUnavailableError as exc:
            other_device = {"cuda": "cpp", "cpu": "triton"}[DEV]
            row.update(
                ok=name == other_device and "tensors are on" in str(exc), status="refused", reason=str(exc)[:150]
            )
            rows.append(row)
            continue
        except Exception as exc:  # report and go on
            row.update(ok=False, status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
            continue
        errs = dict(out=rel(out, ref_out), **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
        row.update(
            errors=errs,
            ok=max(errs.values()) < REL[dtype],
            status="ran",
            ms=timed(op, *qkv, kpm, name, weight),
            auto=name == auto,
        )
        rows.append(row)
    rows.append(
        dict(
            op=op,
            dtype=str(dtype).replace("torch.", ""),
            backend="(auto)",
            status=auto,
            ok=auto == "triton" or DEV == "cpu",
        )
    )


def check_fallback(rows: list, caplog: list) -> None:
    base, kpm = inputs(torch.bfloat16, d=48, seed=3)  # head dim 48: no Triton tile
    for op in ("sliding_window", "landmark"):
        q, k, v = (x.to(DEV).to(torch.bfloat16) for x in base)
        before = len(caplog)
        for _ in range(2):
            run_op(op, q, k, v, kpm, None)
        new = caplog[before:]
        chosen = choose_backend(op, q, k, v, **params(op))
        rows.append(
            dict(
                op=op,
                dtype="bfloat16 d48",
                backend="(fallback)",
                status=f"{chosen}, {len(new)} warning(s)",
                ok=chosen == "reference" and len(new) == 1 and "head dims" in new[0],
                reason=" | ".join(new),
            )
        )


def check_compile(rows: list) -> None:
    for op in ("sliding_window", "block_sparse", "linear_attention", "landmark"):
        row = dict(op=op, dtype="bfloat16", backend="(compile)")
        try:
            base, kpm = inputs(torch.bfloat16, seed=4)
            torch._dynamo.reset()
            q, k, v = (x.to(DEV).to(torch.bfloat16).requires_grad_() for x in base)
            fn = torch.compile(lambda q, k, v: run_op(op, q, k, v, kpm, None), fullgraph=True, backend="aot_eager")
            got = fn(q, k, v)
            got_grads = torch.autograd.grad(got.float().sum(), (q, k, v))
            want = run_op(op, q, k, v, kpm, None)
            want_grads = torch.autograd.grad(want.float().sum(), (q, k, v))
            errs = [rel(got, want)] + [rel(a, b) for a, b in zip(got_grads, want_grads)]
            row.update(status="compiled", ok=max(errs) < 1e-6, errors=dict(zip(("out", "dq", "dk", "dv"), errs)))
        except Exception as exc:
            row.update(status="error", ok=False, reason=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)


class _Collect(logging.Handler):
    def __init__(self, store):
        super().__init__(logging.WARNING)
        self.store = store

    def emit(self, record):
        self.store.append(record.getMessage())


def main() -> int:
    global DEV, N
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for backends_gpu.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the script")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    DEV = args.device
    if DEV == "cpu":
        N = 256
    elif not torch.cuda.is_available():
        print("CUDA is not available: nothing to check")
        return 1
    warnings: list = []
    logging.getLogger("efficient_attention.kernels.dispatch").addHandler(_Collect(warnings))
    rows: list = []
    t0 = time.time()
    for op in ("sliding_window", "block_sparse", "linear_attention", "landmark"):
        for dtype in (torch.bfloat16, torch.float32):  # fp16 runs the bf16 code paths
            check_op(op, dtype, rows)
    if DEV == "cuda":
        check_fallback(rows, warnings)
    check_compile(rows)
    with open(os.path.join(args.out, "backends_gpu.json"), "w") as f:
        json.dump(
            dict(
                device=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
                torch=torch.__version__,
                rows=rows,
                seconds=time.time() - t0,
            ),
            f,
            indent=1,
            default=str,
        )
    print(f"\n{'op':<17}{'dtype':<13}{'backend':<11}{'status':<26}{'max rel err':>12}{'fwd+bwd ms':>11}  ok")
    for r in rows:
        err = max(r["errors"].values()) if "errors" in r else None
        print(
            f"{r['op']:<17}{r['dtype']:<13}{r['backend']:<11}{r['status']:<26}"
            f"{'' if err is None else f'{err:.1e}':>12}{'' if 'ms' not in r else format(r['ms'], '.2f'):>11}  "
            f"{'ok' if r['ok'] else 'FAIL'}" + (f"  {r['reason']}" if not r["ok"] and r.get("reason") else "")
        )
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks ok in {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
