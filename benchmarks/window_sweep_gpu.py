"""Per-kernel config sweep of the sliding-window Triton kernels at issue 14's wide windows (about 2 minutes).

For causal windows W in {1024, 2048, 4096} at N = 64k, B = 1, H = 16, bf16, d in {64, 128}: every candidate
config of the forward, dq and dk/dv kernels (tiles, warps, stages, TMA loads) is first checked against an fp32
reference at a small N (output and the three gradients), then timed at N = 64k with ``triton.testing.do_bench``:
the forward alone, and the backward (``triton_ops._backward``, both kernels) with one kernel's config varied and
the other's kept at ``window_config``'s choice (the ranking within one kernel is its own).  The best
fwd / dq / dk+dv configs are then combined and timed forward+backward through the public
``sliding_window_attention``, next to compiled FlexAttention (compiled once per head dim: the window is a
captured tensor) and the FA2 window of ``varlen_attn`` built as in ``kernels_gpu.py``.  A time budget
(``--budget`` seconds, default 95, half per head dim) skips the remaining candidates rather than running long.

    PYTHONPATH=$PWD python benchmarks/window_sweep_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_gpu import varlen_window_fn  # noqa: E402

from efficient_attention.kernels import sliding_window_attention, triton_ops  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402

N, H, DTYPE, DEVICE = 65536, 16, torch.bfloat16, "cuda"
WINDOWS = (4096, 2048, 1024)  # widest first: it matters most, and a head dim's first W pays the compiles


def C(bm: int, bn: int, warps: int, stages: int, **extra) -> dict:
    """A kernel config: ``bm`` query rows x ``bn`` keys in every kernel; TMA loads unless ``TMA=False`` (these
    spans are all >= TMA_MIN_SPAN); ``maxnreg`` caps registers per thread (more programs per SM)."""
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, LUT_BLOCK=max(bm, bn, 64), TMA=True)
    return dict(cfg, **extra)


# Candidates per kernel (window_config's choice always runs first; the kernels are interleaved and the budget cuts
# the tail), from the first H200 run (benchmarks/results/h200/window_sweep_1812.log), whose registers a thread
# (read off the loaded kernels) were: d = 64 fwd 64x64 126 (56 KB of shared memory: 3 programs per SM), dq 148 (3),
# dk/dv 200 (2; maxnreg 168: 3, 14 bytes spilled), dk/dv 32x64 144 (3); d = 128: every dk/dv tile at 255 registers
# spills except 32x64 w4 (225) and pointer-loaded 64x128.  Offline compiles (window_kernel_registers.py) count
# 20-50 more registers than the launched kernels (no argument specialisation): a ranking, not a count.
CANDIDATES = {
    64: dict(
        fwd=[
            C(64, 64, 4, 2),
            C(64, 64, 4, 3, maxnreg=128),
            C(64, 64, 4, 4),
            C(128, 64, 8, 3),
            C(64, 64, 4, 3, TMA=False),
        ],
        dq=[
            C(64, 64, 4, 3),
            C(64, 64, 4, 2, maxnreg=128),
            C(64, 32, 4, 3),
            C(64, 64, 4, 3, maxnreg=120),
            C(64, 32, 4, 4),
            C(64, 64, 4, 3, TMA=False, maxnreg=128),
        ],
        dkdv=[
            C(64, 64, 4, 3),
            C(32, 64, 4, 3),
            C(32, 64, 4, 3, maxnreg=128),
            C(64, 64, 4, 2, maxnreg=168),
            C(32, 128, 4, 3),
            C(64, 64, 4, 3, maxnreg=160),
        ],
    ),
    128: dict(
        fwd=[C(64, 64, 4, 3), C(64, 64, 4, 2), C(128, 64, 8, 3), C(128, 128, 8, 2), C(128, 64, 8, 3, TMA=False)],
        dq=[
            C(64, 32, 4, 3),
            C(64, 64, 4, 2),
            C(128, 64, 8, 3),
            C(64, 32, 4, 2),
            C(128, 32, 8, 3),
            C(128, 64, 8, 3, TMA=False),
        ],
        dkdv=[
            C(64, 128, 8, 3),
            C(32, 64, 4, 3),
            C(64, 64, 8, 2),
            C(64, 64, 8, 3),
            C(64, 128, 8, 3, TMA=False),
            C(64, 64, 4, 2),
        ],
    ),
}
KINDS = ("fwd", "dq", "dkdv")


def bench(fn, grad_of=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_of, return_mode="median")


def label(cfg: dict) -> str:
    """``64x64w4s3`` (BLOCK_M x BLOCK_N, warps, stages), ``p``: pointer loads instead of TMA, ``rNNN``: maxnreg."""
    tma = "" if cfg["TMA"] else "p"
    reg = f"r{cfg['maxnreg']}" if cfg.get("maxnreg") else ""
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}{tma}{reg}"


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


class Sweep:
    def __init__(self, args):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.args = args
        self.t0 = time.time()
        self.rows: list = []
        self.summary: list = []
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.create_block_mask = create_block_mask
        self.deadline = self.t0 + args.budget
        self.compiled: set = set()  # (D, kernel, label) already compiled: cheap to time at the next W
        self.failed: set = set()

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self):
        with open(self.args.out, "w") as f:
            json.dump(
                dict(
                    device=torch.cuda.get_device_name(0),
                    torch=torch.__version__,
                    triton=__import__("triton").__version__,
                    N=N,
                    H=H,
                    rows=self.rows,
                    summary=self.summary,
                ),
                f,
                indent=1,
            )

    def reference(self, W, D):
        """Small-N check inputs of window W and their fp32 reference output and gradients (H and n multiples of 16,
        as at N = 64k: Triton specialises integer arguments on that, so the checked kernel is the timed one)."""
        n = 2 * W + 256
        g = torch.Generator(device=DEVICE).manual_seed(W + D)
        q, k, v, do = (torch.randn(1, H, n, D, device=DEVICE, generator=g).to(DTYPE) for _ in range(4))
        qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
        i = torch.arange(n, device=DEVICE)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < W)
        out = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
        out.backward(do.float())
        return (q, k, v, do), (out.detach(), qf.grad, kf.grad, vf.grad)

    def check(self, kind, cfgs, rule, small, ref) -> float:
        """The largest relative error of the output (fwd) or of dq, dk, dv (dq, dkdv) against the reference."""
        q, k, v, do = small
        lut = triton_ops._no_lut(q)
        out, lse = triton_ops._forward(q, k, v, None, rule, lut, cfgs["fwd"])
        if kind == "fwd":
            return rel(out, ref[0])
        grads = triton_ops._backward(do, None, q, k, v, out, lse, None, rule, lut, lut, cfgs)
        return max(rel(g, r) for g, r in zip(grads, ref[1:]))

    def kernels(self, W, D, big):
        """Check and time every candidate of each kernel at window W; returns the best config per kernel."""
        q, k, v, do = big
        rule = triton_ops._window_rule(D**-0.5, 0, 1, W - 1, 0, True)
        lut = triton_ops._no_lut(q)
        default = triton_ops.window_config(W, D, DTYPE)
        small, ref = self.reference(W, D)
        with torch.no_grad():
            out, lse = triton_ops._forward(q, k, v, None, rule, lut, default["fwd"])
        queues = {}
        for kind in KINDS:
            labels = {label(default[kind]): default[kind]}
            for cfg in CANDIDATES[D][kind]:
                labels.setdefault(label(cfg), cfg)
            queues[kind] = list(labels.values())
        order = [
            (kind, queues[kind][i])
            for i in range(max(map(len, queues.values())))
            for kind in KINDS
            if i < len(queues[kind])
        ]  # round robin over the kernels: the budget cuts each one's tail
        results: dict = {kind: [] for kind in KINDS}
        skipped = 0
        for kind, cfg in order:
            key = label(cfg)
            if (D, kind, key) in self.failed:
                continue
            is_default = key == label(default[kind])
            if self.left() < 0 and not is_default and (D, kind, key) not in self.compiled:  # compiled: ~0.2 s
                skipped += 1
                continue
            cfgs = dict(default, **{kind: cfg})
            row = dict(D=D, W=W, kernel=kind, cfg=cfg, label=key, default=is_default)
            try:
                row["err"] = err = self.check(kind, cfgs, rule, small, ref)
                self.compiled.add((D, kind, key))
                if not err < 2e-2:
                    raise AssertionError(f"relative error {err:.1e}")
                if kind == "fwd":
                    row["ms"] = bench(lambda: triton_ops._forward(q, k, v, None, rule, lut, cfg))
                else:
                    row["ms"] = bench(
                        lambda: triton_ops._backward(do, None, q, k, v, out, lse, None, rule, lut, lut, cfgs)
                    )
            except Exception as exc:  # out of resources, a wrong result
                self.failed.add((D, kind, key))
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                row["ms"] = math.nan
            self.rows.append(row)
            results[kind].append(row)
            if "error" in row:
                print(f"  d={D} W={W} {kind} {key}: {row['error'][:100]}", flush=True)
        timed = sum(len(r) for r in results.values())
        print(f"d={D} W={W}: {timed} configs checked and timed, {skipped} skipped [{time.time() - self.t0:.0f}s]")
        best = {}
        for kind in KINDS:
            ok = [r for r in results[kind] if not math.isnan(r["ms"])]
            base = [r for r in ok if r["default"]]
            best[kind] = dict(
                cfg=min(ok, key=lambda r: r["ms"])["cfg"] if ok else default[kind],
                ms=min((r["ms"] for r in ok), default=math.nan),
                default_ms=base[0]["ms"] if base else math.nan,
            )
        self.save()
        return best

    def baselines(self, W, D, big):
        """Forward and forward+backward ms of compiled Flex and of varlen_attn's FA2 window."""
        q, k, v, do = big
        w_t = torch.tensor(W, device=DEVICE)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < w_t)

        bm = self.create_block_mask(mask_mod, None, None, N, N, device=DEVICE)
        res = {}
        fns = {"flex": (lambda q, k, v: self.flex(q, k, v, block_mask=bm), (q, k, v, do))}
        varlen = varlen_window_fn(1, N, W)
        if varlen is not None:
            packed = [t.detach().transpose(1, 2).reshape(N, H, D).contiguous() for t in (q, k, v, do)]
            fns["varlen"] = (varlen, [t.requires_grad_() for t in packed[:3]] + packed[3:])
        for name, (fn, (a, b, c, g)) in fns.items():
            try:
                with torch.no_grad():
                    fwd = bench(lambda: fn(a, b, c))
                res[name] = (fwd, bench(lambda: fn(a, b, c).backward(g), grad_of=[a, b, c]))
            except Exception as exc:
                print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                res[name] = (math.nan, math.nan)
        return res

    def ours(self, W, D, big, cfgs) -> tuple:
        """Forward and forward+backward ms through the public op with ``cfgs`` in place of window_config."""
        q, k, v, do = big
        window = LocalWindow.sliding(W - 1, 0, causal=True)
        saved = triton_ops.window_config
        triton_ops.window_config = lambda *a: cfgs
        try:
            with torch.no_grad():
                fwd = bench(lambda: sliding_window_attention(q, k, v, window)[0])
            fb = bench(lambda: sliding_window_attention(q, k, v, window)[0].backward(do), grad_of=[q, k, v])
        finally:
            triton_ops.window_config = saved
        return fwd, fb

    def run(self):
        a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
        end = time.time() + 3
        while time.time() < end:  # warm the GPU to its steady clocks before the first timing
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
        a = None
        for i, D in enumerate((64, 128)):  # half the budget each (most compiles come at a head dim's first W)
            self.deadline = self.t0 + self.args.budget * (i + 1) / 2
            big = [torch.randn(1, H, N, D, device=DEVICE, dtype=DTYPE, requires_grad=i < 3) for i in range(4)]
            for W in WINDOWS:
                base = self.baselines(W, D, big)
                best = self.kernels(W, D, big)
                default = triton_ops.window_config(W, D, DTYPE)
                tuned = {kind: best[kind]["cfg"] for kind in KINDS}
                runs = [self.ours(W, D, big, c) for c in (default, tuned, default, tuned)]  # ABAB: clock drift
                ours_default = tuple(map(min, zip(runs[0], runs[2])))
                ours_best = tuple(map(min, zip(runs[1], runs[3])))
                self.summary.append(
                    dict(
                        D=D,
                        W=W,
                        best=best,
                        ours_default=ours_default,
                        ours_best=ours_best,
                        flex=base["flex"],
                        varlen=base.get("varlen", (math.nan, math.nan)),
                    )
                )
                self.save()
            big = None
            torch.cuda.empty_cache()

    def report(self):
        print(
            f"\nbest config per kernel (ms: fwd alone; dq / dkdv: the whole backward with that kernel's config)"
            f"  [{time.time() - self.t0:.0f}s]"
        )
        for s in self.summary:  # every timed config, fastest first (* the default)
            for kind in KINDS:
                rows = [r for r in self.rows if (r["D"], r["W"], r["kernel"]) == (s["D"], s["W"], kind)]
                rows = sorted(rows, key=lambda r: (math.isnan(r["ms"]), r["ms"]))
                cells = " ".join(f"{'*' if r['default'] else ''}{r['label']} {r['ms']:.3f}" for r in rows)
                print(f"d={s['D']} W={s['W']} {kind}: {cells}")
        print(f"{'d':>4} {'W':>5} {'kernel':6} {'default ms':>10} {'best ms':>8}  best config")
        for s in self.summary:
            for kind in KINDS:
                b = s["best"][kind]
                print(f"{s['D']:4d} {s['W']:5d} {kind:6} {b['default_ms']:10.3f} {b['ms']:8.3f}  {label(b['cfg'])}")
        print(
            "\nforward+backward ms through sliding_window_attention (fwd ms in brackets); target x1.25 flex, "
            "x1.5 varlen"
        )
        print(
            f"{'d':>4} {'W':>5} {'default':>15} {'best':>15} {'flex':>15} {'varlen':>15} {'x flex':>7} {'x varlen':>8}"
            "  (default: x flex, x varlen)"
        )
        for s in self.summary:
            cell = lambda p: f"{p[1]:7.3f} ({p[0]:5.2f})"  # noqa: E731
            ob, od = s["ours_best"][1], s["ours_default"][1]
            print(
                f"{s['D']:4d} {s['W']:5d} {cell(s['ours_default']):>15} {cell(s['ours_best']):>15} "
                f"{cell(s['flex']):>15} {cell(s['varlen']):>15} {s['flex'][1] / ob:7.2f} {s['varlen'][1] / ob:8.2f}"
                f"  ({s['flex'][1] / od:.2f}, {s['varlen'][1] / od:.2f})"
            )


def resources():
    """Registers, spills and shared memory of every window kernel compiled in this run (best effort: reads
    Triton's in-memory kernel cache, whose layout is Triton 3.x's)."""
    from efficient_attention.kernels import _triton_kernels as tk

    print("\nregisters a thread, spilled bytes, shared memory of the compiled window kernels:")
    try:
        for kind, fn in (("fwd", tk._fwd_kernel), ("dq", tk._bwd_dq_kernel), ("dkdv", tk._bwd_dkdv_kernel)):
            for caches in fn.device_caches.values():
                for kern in caches[0].values():
                    if kern.module is None:  # never launched
                        continue
                    c = {fn.arg_names[key[0]]: val for key, val in kern.src.constants.items()}
                    if not c.get("WINDOW") or c.get("USE_LUT"):
                        continue
                    m = kern.metadata
                    cfg = dict(c, num_warps=m.num_warps, num_stages=m.num_stages, maxnreg=getattr(m, "maxnreg", None))
                    print(
                        f"{kind} d={c['HEAD_DIM']} {label(cfg)}: {kern.n_regs} regs, {kern.n_spills} spills, "
                        f"{m.shared / 1024:.0f} KB"
                    )
    except Exception as exc:  # a diagnostic only
        print(f"(kernel resources unavailable: {type(exc).__name__}: {exc})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="window_sweep.json", help="a .json file or a directory")
    p.add_argument("--budget", type=float, default=95.0, help="seconds after which remaining candidates are skipped")
    args = p.parse_args()
    if not args.out.endswith(".json"):
        os.makedirs(args.out, exist_ok=True)
        args.out = os.path.join(args.out, "window_sweep.json")
    torch._dynamo.config.cache_size_limit = 64
    s = Sweep(args)
    s.run()
    resources()
    s.report()


if __name__ == "__main__":
    main()
