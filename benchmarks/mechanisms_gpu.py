"""Every mechanism against SDPA and against the CAB library, in CAB's efficiency setting, in one device call.

    python benchmarks/mechanisms_gpu.py --out DIR            # H200: fits one 10-minute call
    python benchmarks/mechanisms_gpu.py --smoke --out DIR    # CPU, tiny sizes (the test runs this)

On the device (the ``run`` tool) carry the git-ignored CAB copy: ``carry=[".cab"]``,
command ``PYTHONUNBUFFERED=1 python benchmarks/mechanisms_gpu.py --out $OUT/mech``.

Three parts, run one after the other, each point in a worker process:

* ``train`` -- CAB's efficiency setting (issue 13): self-attention on
  ``(L, B=4, 512)``, 8 heads of 64, fp32 weights under bf16 autocast, dropout
  0, train mode, ``loss = out.sum()``, forward + backward, module level
  (projections included), for every registered mechanism and each of
  noncausal self / causal self it supports, L in 1k ... 32k.  ``vanilla``
  (our module on SDPA) is the baseline.  Options: each mechanism's defaults
  except :data:`OPTIONS` (the ones the issues name).
* ``cab`` -- the same harness (``efficient_attention/benchmark/timing.py``,
  loaded by path) on CAB's implementation of the same mechanism and pattern
  (:data:`CAB_CLASSES`), in a separate process whose ``sys.path`` holds CAB's
  package (it is also called ``efficient_attention``) from ``.cab/`` (git
  ignored; see benchmarks/README.md for how it is made).  Without ``.cab/``
  the part is recorded as skipped.
* ``decode`` -- one decoding step of one layer (B = 4, eval, bf16 autocast) at
  contexts 512, 8k and 64k for every causal mechanism that decodes, through
  :func:`efficient_attention.benchmark.measure_point` (state filled by a
  prefill or constructed, copied, and restored before every timed step).

Points run from the shortest length up, all series of a part at one length
before the next length, so a time limit cuts the longest lengths of every
series alike.  A series stops (``skipped`` with a reason, recorded) after an
out-of-memory error, a crash or a timeout, after a call slower than
``--budget`` seconds, or when the next length is predicted (with the
series' growth, exponent 1..2.5) to pass ``4 x budget``; every other error is
recorded and the series goes on.  Each part has a deadline (a share of
``--max-time``; time a part leaves over goes to the next).

Writes ``DIR/mechanisms_gpu.json`` (device name, torch / Triton / CUDA
versions, the setting, every point) after every point and prints compact
tables last: time with SDPA÷ours and CAB÷ours (> 1: ours faster), peak memory,
and the decoding steps against issue 14's targets.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import platform
import select
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAB_DIR = ROOT / ".cab" / "efficient-attention"  # CAB's efficient-attention/ folder; its wheels/ beside it hold
# einops and opt_einsum, which CAB imports (pure-Python wheels, importable as zips)
TIMING = ROOT / "efficient_attention" / "benchmark" / "timing.py"
RESULT = "@@result "

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
CONTEXTS = (512, 8192, 65536)
PATTERNS = ("noncausal self", "causal self")
SETTING = dict(batch=4, heads=8, dim=64, dtype="float32", autocast="bfloat16")
SMOKE = dict(batch=2, heads=2, dim=16, dtype="float32", autocast="bfloat16")
SMOKE_LENGTHS, SMOKE_CONTEXTS = (32, 64), (16, 64)

# Options the issues name; everything else is each mechanism's (and CAB's) default.
OPTIONS = {
    "local": {"wsize": 128},  # issue 13: "local with a 128 window"
    # issue 14: the fixed layout at block sizes 64 and 128; a chunk of l = local_attn_ctx tokens plus one summary
    # block per chunk keeps about l/L + block/l of the scores (noncausal): 81% sparse at 8k, 90% at 32k
    "block_sparse": {"block_size": 64, "local_attn_ctx": 1024},
}
VARIANTS = {"block_sparse@128": ("block_sparse", {"block_size": 128, "local_attn_ctx": 2048})}  # label: (name, opts)
DECODE_OPTIONS = {"cosformer": {"max_len": max(CONTEXTS) + 64}}  # causal cosFormer decodes with a fixed M
# (our mechanism, pattern) -> (CAB class, CAB constructor options).  CAB's Performer silently turns causal
# off and its MultiheadAttention applies no causal mask itself: neither is a causal baseline.
CAB_CLASSES = {
    ("abc", "noncausal self"): ("ABC", {}),
    ("abc", "causal self"): ("ABC", {}),
    ("cosformer", "noncausal self"): ("CosformerAttention", {}),
    ("lara", "noncausal self"): ("Lara", {}),
    ("local", "noncausal self"): ("LocalAttention", {"wsize": 128}),
    ("local", "causal self"): ("LocalAttention", {"wsize": 128}),
    ("nystrom", "noncausal self"): ("NystromAttention", {}),
    ("performer", "noncausal self"): ("Performer", {}),
    ("probsparse", "noncausal self"): ("ProbSparse", {}),
    ("s4d", "noncausal self"): ("S4D", {"bidirectional": True}),
    ("s4d", "causal self"): ("S4D", {}),
    ("attention_ls", "noncausal self"): ("AttentionLS", {}),
    ("longshort", "noncausal self"): ("AttentionLS", {}),
    ("causal_ls", "causal self"): ("CausalLS", {}),
    ("longshort", "causal self"): ("CausalLS", {}),
}
PART_SHARES = {"train": 0.55, "cab": 0.25, "decode": 0.20}  # cumulative deadlines: 55%, 80%, 100% of --max-time


# ====================================================================== worker side
def _load_timing():
    spec = importlib.util.spec_from_file_location("ea_bench_timing", TIMING)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _device_info(torch) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["device"] = platform.processor() or platform.machine()
    return info


class _OursBuilder:
    def __init__(self):
        sys.path.insert(0, str(ROOT))
        from efficient_attention.benchmark.measure import _build, measure_point, parse_pattern, resolve_mechanism

        self._build, self.measure_point = _build, measure_point
        self.parse_pattern, self.resolve = parse_pattern, resolve_mechanism

    def build(self, point, torch):
        pattern = self.parse_pattern(point["pattern"])
        cls = self.resolve(point["mechanism"])
        return self._build(
            cls,
            pattern,
            point["heads"] * point["dim"],
            point["heads"],
            torch.device(point["device"]),
            torch.float32,
            point.get("options") or {},
        )


class _CabBuilder:
    def __init__(self, cab_dir: Path):
        sys.path[:0] = [str(cab_dir)] + sorted(glob.glob(str(cab_dir.parent / "wheels" / "*.whl")))
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)  # CAB warns on every construction
        import efficient_attention as cab

        if Path(cab.__file__).resolve().parents[1] != cab_dir.resolve():
            raise RuntimeError(f"imported {cab.__file__}, not CAB's package under {cab_dir}")
        self.cab = cab

    def build(self, point, torch):
        cls = self.cab.get_cls(point["cab_class"])
        causal = point["pattern"] == "causal self"
        module = cls(
            embed_dim=point["heads"] * point["dim"],
            num_heads=point["heads"],
            dropout=0.0,
            causal=causal,
            cross=False,
            **(point.get("options") or {}),
        )
        if bool(getattr(module, "causal", causal)) != causal:
            raise ValueError(f"CAB's {point['cab_class']} turned causal={causal} into {module.causal}")
        return module.to(torch.device(point["device"]))


def _train_point(point, builder, timing, torch) -> dict:
    device = torch.device(point["device"])
    torch.manual_seed(point.get("seed", 0))
    module = builder.build(point, torch)
    autocast = timing.DTYPES[point["autocast"]] if point.get("autocast") else None
    call, reset = timing.train_case(
        module, point["length"], point["batch"], point["heads"] * point["dim"], device, autocast, point.get("seed", 0)
    )
    out = timing.run_timed(call, reset, device, point["warmup"], point["repeats"], point["budget"])
    out.update(timing.peak_bytes(call, reset, device))
    out["cost_s"] = min(out["times_s"])
    return out


_FATAL_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address")


def worker_main(kind: str, cab_dir: Path) -> None:
    """Read points (JSON lines) on stdin, answer each with one ``@@result`` line on stdout."""
    import gc

    import torch

    timing = _load_timing()
    info = _device_info(torch)
    try:
        builder = _OursBuilder() if kind == "ours" else _CabBuilder(cab_dir)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records every point as skipped
        print(RESULT + json.dumps({"ready": False, "detail": f"{type(exc).__name__}: {exc}", **info}), flush=True)
        return
    print(RESULT + json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        point = json.loads(line)
        try:
            if point["part"] == "decode":
                res = builder.measure_point(point)
            else:
                res = dict(status="ok", **_train_point(point, builder, timing, torch))
        except Exception as exc:  # noqa: BLE001 - a failure is data
            status, text = timing.classify_exception(exc)
            res = {"status": status, "detail": text}
            if status == "error":
                res["traceback"] = traceback.format_exc()[-2000:]
        gc.collect()
        fatal = any(t in str(res.get("detail", "")).lower() for t in _FATAL_CUDA)
        if torch.cuda.is_available() and not fatal:
            torch.cuda.empty_cache()
        print(RESULT + json.dumps(res, default=str), flush=True)
        if fatal:  # the CUDA context is unusable: the parent starts a fresh worker for the next point
            return


# ====================================================================== parent side
class Worker:
    """A worker process (``--worker ours|cab``), restarted after a crash or a timeout."""

    def __init__(self, kind: str, timeout: float, cab_dir: Path):
        self.kind, self.timeout, self.cab_dir, self.proc, self.info = kind, timeout, cab_dir, None, None
        self.broken = None  # why the worker could not start: not tried again

    def _start(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.kind == "cab":
            env.pop("PYTHONPATH", None)  # CAB's efficient_attention must not meet ours
        else:
            paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + paths)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", self.kind, "--cab-dir", str(self.cab_dir)]
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buf = b""
        info = self._read(max(self.timeout, 180.0))
        if info is None:
            self.stop()
            info = {"ready": False, "detail": f"the {self.kind} worker did not start"}
        self.info = info
        return info

    def _read(self, timeout: float):
        """The next ``@@result`` line of the worker (other lines are passed to stderr), or None on timeout / exit.

        Reads the pipe's descriptor directly: a buffered reader could hold a complete line that ``select``
        no longer reports.
        """
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                if text.startswith(RESULT):
                    return json.loads(text[len(RESULT) :])
                sys.stderr.write(f"[{self.kind} worker] {text}\n")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None  # the worker died
            self._buf += chunk

    def run(self, point: dict) -> dict:
        if self.broken is not None:
            return {"status": "skipped", "reason": "no worker", "detail": self.broken}
        if self.proc is None or self.proc.poll() is not None:
            info = self._start()
            if not info.get("ready"):
                self.broken = info.get("detail", "the worker did not start")
                return {"status": "skipped", "reason": "no worker", "detail": self.broken}
        try:
            self.proc.stdin.write((json.dumps(point) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        res = self._read(self.timeout)
        if res is not None:
            return res
        alive = self.proc.poll() is None
        code = self.proc.poll()
        self.stop()
        if alive:
            detail = f"killed after the {self.timeout:.0f} s point timeout"
            return {"status": "error", "reason": "timeout", "detail": detail}
        return {"status": "error", "reason": "crash", "detail": f"worker process exited with code {code}"}

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _skip_reason(done: list, length: int, budget: float):
    """Why a series skips ``length``, from its shorter points (see the module docstring), else ``None``."""
    ok = []
    for p in done:
        if p["status"] == "oom" or p.get("reason") == "oom":
            return "oom", f"out of memory at length {p['length']}"
        if p.get("reason") in ("crash", "timeout", "after failure", "no worker"):
            return "after failure", f"{p.get('reason')} at length {p['length']}"
        if p["status"] == "skipped" and p.get("reason") == "budget":
            return "budget", p.get("detail", "")
        if p["status"] == "ok":
            if p["cost_s"] > budget:
                return "budget", f"a call took {p['cost_s']:.3g} s > budget {budget:g} s at length {p['length']}"
            ok.append(p)
    if len(ok) >= 1:
        last = ok[-1]
        exp = 2.0
        if len(ok) >= 2 and ok[-2]["cost_s"] > 0 and last["cost_s"] > 0:
            exp = math.log(last["cost_s"] / ok[-2]["cost_s"]) / math.log(last["length"] / ok[-2]["length"])
            exp = min(2.5, max(1.0, exp))
        predicted = last["cost_s"] * (length / last["length"]) ** exp
        if predicted > 4 * budget:
            return "budget", f"predicted {predicted:.3g} s per call > 4 x budget {budget:g} s"
    return None


def plan(args, setting: dict) -> list:
    """The series of every part: (part, label, mechanism, pattern, options, cab class)."""
    sys.path.insert(0, str(ROOT))
    from efficient_attention.benchmark.sweep import SweepConfig, plan_series

    names = list(args.mechanisms) if args.mechanisms else None
    series = []

    def options_for(name, table):
        opts = dict(OPTIONS.get(name, {}))
        opts.update(table.get(name, {}))
        try:  # an option a merge renamed is dropped and said so, rather than failing the run
            SweepConfig(mechanisms=[name], baselines=(), options={name: opts}).validate()
        except ValueError as exc:
            print(f"warning: {exc}; running {name} without {sorted(opts)}", file=sys.stderr)
            opts = {}
        return opts

    train = plan_series(
        SweepConfig(
            mechanisms=names,
            baselines=("vanilla",),
            patterns=list(PATTERNS),
            modes=("backward",),
            dtypes=(setting["dtype"],),
        )
    )
    for s in train:
        series.append(
            dict(
                part="train",
                label=s["mechanism"],
                mechanism=s["mechanism"],
                pattern=s["pattern"],
                options=options_for(s["mechanism"], {}),
            )
        )
    for label, (name, extra) in VARIANTS.items():
        for s in train:
            if s["mechanism"] == name:
                series.append(
                    dict(
                        part="train",
                        label=label,
                        mechanism=name,
                        pattern=s["pattern"],
                        options={**options_for(name, {}), **extra},
                    )
                )
    for s in train:
        key = (s["mechanism"], s["pattern"])
        if key in CAB_CLASSES:
            cls, opts = CAB_CLASSES[key]
            series.append(
                dict(
                    part="cab",
                    label=s["mechanism"],
                    mechanism=s["mechanism"],
                    pattern=s["pattern"],
                    cab_class=cls,
                    options=dict(opts),
                )
            )
    decode = plan_series(
        SweepConfig(
            mechanisms=names,
            baselines=("vanilla",),
            patterns=["causal self"],
            modes=("decode",),
            dtypes=(setting["dtype"],),
        )
    )
    for s in decode:
        series.append(
            dict(
                part="decode",
                label=s["mechanism"],
                mechanism=s["mechanism"],
                pattern=s["pattern"],
                options=options_for(s["mechanism"], DECODE_OPTIONS),
            )
        )
    return [s for s in series if s["part"] in args.parts]


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(args) -> dict:
    setting = dict(SMOKE if args.smoke else SETTING)
    device = "cpu" if args.smoke else "cuda"
    lengths = SMOKE_LENGTHS if args.smoke else tuple(args.lengths)
    contexts = SMOKE_CONTEXTS if args.smoke else tuple(args.contexts)
    series = plan(args, setting)
    workers = {kind: Worker(kind, args.point_timeout, args.cab_dir) for kind in ("ours", "cab")}
    result = {
        "script": "benchmarks/mechanisms_gpu.py",
        "smoke": bool(args.smoke),
        "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "setting": {
            **setting,
            "embed_dim": setting["heads"] * setting["dim"],
            "device": device,
            "lengths": list(lengths),
            "contexts": list(contexts),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "budget_s": args.budget,
            "point_timeout_s": args.point_timeout,
            "max_time_s": args.max_time,
            "loss": "out.sum()",
            "dropout": 0.0,
            "train_mode": True,
            "options": OPTIONS,
            "decode_options": DECODE_OPTIONS,
            "variants": {k: list(v) for k, v in VARIANTS.items()},
        },
        "info": {},
        "cab_dir": str(args.cab_dir),
        "cab_available": args.cab_dir.is_dir(),
        "points": [],
    }
    out_path = Path(args.out) / "mechanisms_gpu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    share = 0.0
    for part in ("train", "cab", "decode"):
        if part not in args.parts:
            continue
        share += PART_SHARES[part] / sum(PART_SHARES[q] for q in args.parts)  # the parts asked for share all the time
        deadline = t_start + share * args.max_time
        worker = workers["cab" if part == "cab" else "ours"]
        part_series = [s for s in series if s["part"] == part]
        sizes = contexts if part == "decode" else lengths
        done = {i: [] for i in range(len(part_series))}
        total = len(part_series) * len(sizes)
        k = 0
        for length in sizes:
            for i, s in enumerate(part_series):
                k += 1
                point = dict(
                    s,
                    length=length,
                    device=device,
                    warmup=args.warmup,
                    repeats=args.repeats,
                    budget=args.budget,
                    seed=0,
                    **{key: setting[key] for key in SETTING},
                )
                if part == "decode":
                    point["mode"] = "decode"
                skip = _skip_reason(done[i], length, args.budget)
                if skip is None and part == "cab" and not args.cab_dir.is_dir():
                    skip = ("no CAB", f"{args.cab_dir} is missing (see benchmarks/README.md)")
                if skip is None and time.monotonic() > deadline:
                    skip = ("time limit", f"the {part} part passed its deadline ({share:.0%} of {args.max_time:g} s)")
                t0 = time.monotonic()
                res = {"status": "skipped", "reason": skip[0], "detail": skip[1]} if skip else worker.run(point)
                keys = ("part", "label", "mechanism", "pattern", "length", "options")
                rec = {**{key: point[key] for key in keys}, **res}
                rec["wall_s"] = round(time.monotonic() - t0, 3)
                if part == "cab":
                    rec["cab_class"] = s["cab_class"]
                done[i].append(rec)
                result["points"].append(rec)
                _log(part, k, total, time.monotonic() - t_start, rec)
            result["info"][part] = worker.info
            _write(result, out_path)
        worker.stop()  # a fresh process per part: one part's cached memory never limits the next
        _finish(result, t_start, out_path)
        # print each table as soon as its parts are done: a run cut short still shows what it measured
        if part == "decode":
            print(decode_table(result), flush=True)
        elif part == "cab" or (part == "train" and "cab" not in args.parts):
            print(train_table(result), flush=True)
    return result


def _finish(result: dict, t_start: float, out_path: Path) -> None:
    """Versions and device from the workers, elapsed time; JSON and Markdown written."""
    info = result["info"].get("train") or result["info"].get("decode") or result["info"].get("cab") or {}
    result.update({k: info.get(k) for k in ("device", "torch", "triton", "cuda", "python")})
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    _write(result, out_path)
    out_path.with_name("mechanisms_gpu.md").write_text(markdown(result))


def _log(part, k, total, elapsed, rec) -> None:
    head = f"[{part} {k}/{total} {elapsed:.0f}s] {rec['label']} {rec['pattern']} L={rec['length']}"
    if rec["status"] == "ok":
        mem = rec.get("mem_max_allocated_bytes", rec.get("mem_peak_bytes"))
        mem_text = f", peak {mem / 2**30:.2f} GiB" if mem else ""
        print(f"{head}: {rec['time_s'] * 1e3:.3g} ms{mem_text}", file=sys.stderr, flush=True)
    elif rec["status"] != "skipped" or rec.get("reason") not in ("budget", "oom", "after failure", "time limit"):
        text = f"{head}: {rec['status']} {rec.get('reason', '')} {rec.get('detail', '')[:160]}"
        print(text, file=sys.stderr, flush=True)


def _write(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


# ====================================================================== tables
_METRICS = (("time", "time_s", "forward + backward, ms"), ("memory", "mem_max_allocated_bytes", "peak memory, GiB"))
FLAT_TARGETS = ("local", "performer", "cosformer", "abc", "s4d", "causal_ls", "longshort")  # issue 14's 1.3x rule


def _short(p) -> str:
    """A failed or skipped point in a few letters ('' for none or ok)."""
    if p is None or p["status"] == "ok":
        return ""
    return {"oom": "oom", "error": "err"}.get(p["status"], p.get("reason", p["status"]))[:8]


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _index(points, part):
    return {(p["label"], p["pattern"], p["length"]): p for p in points if p["part"] == part}


def _ratio(other, p, key: str) -> str:
    """``other / p`` for ``key`` (above 1: ``p`` is cheaper), else why ``other`` has no number."""
    if other is not None and other["status"] == "ok" and key in other:
        return f"{other[key] / p[key]:.2f}"
    return _short(other) or "-"


def _train_cells(result: dict):
    """``(metric, title, lengths, rows)``; a row is ``(label, pattern, cells)``, a cell ``(ours, SDPA/ours,
    CAB/ours)`` as text or a one-word reason; memory only from 8k on."""
    ours, cab = _index(result["points"], "train"), _index(result["points"], "cab")
    lengths = result["setting"]["lengths"]
    labels = list(dict.fromkeys((p["label"], p["pattern"]) for p in result["points"] if p["part"] == "train"))
    labels.sort(key=lambda r: (r[1] != "noncausal self", r[0] != "vanilla", r[0]))
    for metric, key, title in _METRICS:
        if not any(key in p for p in ours.values()):
            continue  # no memory on the CPU (smoke)
        cols = lengths if metric == "time" else ([n for n in lengths if n >= 8192] or lengths[-1:])
        rows = []
        for label, pattern in labels:
            cells = []
            for n in cols:
                p = ours.get((label, pattern, n))
                if p is None or p["status"] != "ok" or key not in p:
                    cells.append(_short(p))
                    continue
                value = _fmt_ms(p[key]) if metric == "time" else f"{p[key] / 2**30:.2f}"
                cells.append(
                    (
                        value,
                        _ratio(ours.get(("vanilla", pattern, n)), p, key),
                        _ratio(cab.get((label, pattern, n)), p, key),
                    )
                )
            rows.append((label, pattern, cells))
        yield metric, title, cols, rows


def train_table(result: dict) -> str:
    """Plain text: per mechanism and pattern, per length: ours, SDPA/ours, CAB/ours."""
    out = []
    for metric, title, cols, rows in _train_cells(result):
        better = "faster" if metric == "time" else "smaller"
        out.append(f"{title}; cell: ours, SDPA/ours, CAB/ours (> 1: ours {better}; -: no CAB counterpart)")
        out.append(f"{'mechanism':<17}{'pattern':<9}" + "".join(f"{_len(n):>19}" for n in cols))
        for label, pattern, cells in rows:
            text = "".join(f"{c[0]:>7}{c[1]:>6}{c[2]:>6}" if isinstance(c, tuple) else f"{c:>19}" for c in cells)
            out.append(f"{label[:16]:<17}{pattern.split()[0][:8]:<9}{text}")
        out.append("")
    return "\n".join(out)


def _decode_rows(result: dict):
    """Per causal mechanism: step times per context, 64k/512 growth, ours/vanilla per context, verdicts."""
    pts = _index(result["points"], "decode")
    contexts = result["setting"]["contexts"]
    for label in dict.fromkeys(p["label"] for p in result["points"] if p["part"] == "decode"):
        row = [pts.get((label, "causal self", c)) for c in contexts]
        ok = [p is not None and p["status"] == "ok" for p in row]
        growth = row[-1]["time_s"] / row[0]["time_s"] if ok[0] and ok[-1] else None
        vs = []
        for c, p, good in zip(contexts, row, ok):
            v = pts.get(("vanilla", "causal self", c))
            vs.append(p["time_s"] / v["time_s"] if good and v is not None and v["status"] == "ok" else None)
        marks = []
        if label != "vanilla":
            met = all(r is not None and r <= 2.0 for r in vs)
            marks.append("2x-vanilla " + ("met" if met else "MISSED"))
        if label in FLAT_TARGETS:
            marks.append("flat " + ("met" if growth is not None and growth <= 1.3 else "MISSED"))
        grow = [p["step_growing_s"] / p["time_s"] for p, good in zip(row, ok) if good and p.get("step_growing_s")]
        if grow and max(grow) > 1.5:  # consecutive steps (growing context) much slower than a repeated step
            marks.append(f"growing-context steps {max(grow):.1f}x slower")
        yield label, row, growth, vs, marks


def decode_table(result: dict) -> str:
    """One decoding step (ms) per context, the longest/shortest ratio and ours/vanilla, against issue 14's targets."""
    contexts = result["setting"]["contexts"]
    lo, hi = _len(contexts[0]), _len(contexts[-1])
    out = [
        f"decoding step, ms (B=4, one layer, bf16 autocast, state restored before each step); targets: "
        f"<= 2x vanilla at each context; {', '.join(FLAT_TARGETS)}: the {hi} step <= 1.3x the {lo} step",
        f"{'mechanism':<14}"
        + "".join(f"{_len(c):>8}" for c in contexts)
        + f"{hi + '/' + lo:>9}"
        + "".join(f"{'/van@' + _len(c):>10}" for c in contexts)
        + "  targets",
    ]
    for label, row, growth, vs, marks in _decode_rows(result):
        cells = "".join(f"{_fmt_ms(p['time_s']) if p and p['status'] == 'ok' else _short(p):>8}" for p in row)
        cells += f"{growth:>9.2f}" if growth is not None else f"{'-':>9}"
        cells += "".join(f"{r:>10.2f}" if r is not None else f"{'-':>10}" for r in vs)
        out.append(f"{label[:13]:<14}{cells}  {', '.join(marks)}")
    return "\n".join(out)


def markdown(result: dict) -> str:
    """The tables as Markdown (``mechanisms_gpu.md``), for benchmarks/README.md."""
    out = [
        f"{result.get('device')}, torch {result.get('torch')}, Triton {result.get('triton')}, "
        f"commit {str(result.get('git_commit'))[:10]}, {result.get('started')}.\n"
    ]
    for metric, title, cols, rows in _train_cells(result):
        better = "faster" if metric == "time" else "smaller"
        out.append(f"**{title[0].upper() + title[1:]}**: ours / SDPA÷ours / CAB÷ours (above 1: ours {better})\n")
        out.append("| mechanism | pattern | " + " | ".join(_len(n) for n in cols) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for label, pattern, cells in rows:
            text = " | ".join(" / ".join(c) if isinstance(c, tuple) else c for c in cells)
            out.append(f"| `{label}` | {pattern} | {text} |")
        out.append("")
    contexts = result["setting"].get("contexts", [])
    decode = list(_decode_rows(result))
    if decode:
        lo, hi = _len(contexts[0]), _len(contexts[-1])
        out.append("**Decoding step, ms** (B = 4, one layer; ours / vanilla in brackets)\n")
        out.append("| mechanism | " + " | ".join(_len(c) for c in contexts) + f" | {hi} / {lo} | targets |")
        out.append("|---|" + "---|" * (len(contexts) + 2))
        for label, row, growth, vs, marks in decode:
            cells = [
                (f"{_fmt_ms(p['time_s'])} ({r:.2f})" if r is not None else _fmt_ms(p["time_s"]))
                if p is not None and p["status"] == "ok"
                else _short(p)
                for p, r in zip(row, vs)
            ]
            g = f"{growth:.2f}" if growth is not None else "-"
            out.append(f"| `{label}` | " + " | ".join(cells) + f" | {g} | {', '.join(marks)} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("bench-mechanisms"), help="output folder")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing useful")
    p.add_argument("--parts", nargs="+", default=["train", "cab", "decode"], help="which parts: train cab decode")
    p.add_argument(
        "--mechanisms",
        nargs="+",
        default=None,
        help="only these (default: every registered one; vanilla is always added)",
    )
    p.add_argument("--lengths", nargs="+", default=list(LENGTHS))
    p.add_argument("--contexts", nargs="+", default=list(CONTEXTS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.25, help="seconds per call before a series stops")
    p.add_argument("--point-timeout", type=float, default=45.0, help="seconds before a point's worker is killed")
    p.add_argument("--max-time", type=float, default=480.0, help="seconds for everything (parts share it: 55/25/20%%)")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="print the tables of an earlier run")
    p.add_argument("--cab-dir", type=Path, default=CAB_DIR, help="CAB's efficient-attention folder (git-ignored copy)")
    p.add_argument("--worker", choices=("ours", "cab"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("parts", "mechanisms", "lengths", "contexts"):  # space- or comma-separated, or both
        values = getattr(args, name)
        if values is not None:
            items = [t for v in values for t in str(v).replace(",", " ").split()]
            setattr(args, name, [int(t) for t in items] if name in ("lengths", "contexts") else items)
    if args.worker:
        worker_main(args.worker, args.cab_dir)
        return 0
    for part in args.parts:
        if part not in PART_SHARES:
            p.error(f"--parts: unknown part {part!r}; use train, cab, decode")
    if args.smoke:
        args.warmup, args.repeats, args.budget = 1, 2, 30.0
    if args.report is not None:  # the tables of an earlier run
        result = json.loads(args.report.read_text())
        args.parts = sorted({q["part"] for q in result["points"]})
        if "train" in args.parts:
            print(train_table(result))
        if "decode" in args.parts:
            print(decode_table(result))
    else:
        result = run(args)  # prints the tables as the parts finish
    json_path = args.report or Path(args.out) / "mechanisms_gpu.json"
    print(
        f"device: {result.get('device')}; torch {result.get('torch')}, triton {result.get('triton')}, "
        f"CUDA {result.get('cuda')}; {result.get('elapsed_s')} s; JSON and Markdown: {json_path.with_suffix('.*')}"
    )
    ok = [q for q in result["points"] if q["status"] == "ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
