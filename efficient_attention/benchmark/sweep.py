"""The sweep: mechanisms x patterns x lengths x modes x dtypes x devices.

Points of one *series* (device, dtype, pattern, mode, mechanism) run from the
shortest length up, and the series stops early:

* ``skipped: budget`` -- a point's most expensive call took longer than
  ``budget`` seconds, or the next length is predicted to take more than
  ``4 * budget`` (the cost extrapolated with the series' measured growth
  exponent, clamped to [1, 2.5]); every longer length is skipped.
* ``skipped: memory`` -- on the CPU, the next point's peak memory, extrapolated
  the same way (exponent clamped to [1, 2]), would pass ``max_memory``: the
  operating system would kill the process (or another one) rather than raise
  an error, so such points are not run.
* ``skipped: oom`` / ``skipped: after failure`` -- longer lengths after an
  out-of-memory point or a crash.
* ``skipped: time limit`` -- every point left once the whole sweep has run
  ``max_time`` seconds (series run pattern by pattern, mode by mode, every
  mechanism in turn, so a cut-off hits all mechanisms' later modes alike).

A point that raises any other error is recorded (``error``) and the series
goes on: a mechanism may reject one length and accept the next.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch

from ..base import EfficientAttention
from ..capabilities import Pattern
from ..options import Option
from ..registry import available_attentions
from .efficiency import efficiency_lengths
from .measure import DTYPES, MODES, applicable_modes, parse_pattern, resolve_mechanism
from .naive import NAIVE_NAME
from .runner import InProcessRunner, SubprocessRunner, import_modules

logger = logging.getLogger(__name__)

__all__ = ["SweepConfig", "run_sweep", "plan_series", "machine_info", "DEFAULT_LENGTHS", "SCHEMA"]

SCHEMA = 1
DEFAULT_LENGTHS = tuple(256 * 2**i for i in range(7))  # 256 ... 16384
BASELINES = ("vanilla", NAIVE_NAME)


@dataclass
class SweepConfig:
    """What to sweep and how to measure (the command line's options).

    ``mechanisms=None`` means every registered one; the ``baselines`` are always
    added.  ``budget`` is in seconds per call; ``max_memory_gib`` (CPU only)
    defaults to half the memory available when the sweep starts; ``timeout``
    (seconds per point, worker process only) defaults to
    ``max(120, 30 * budget)``; ``max_time`` (seconds for the whole sweep)
    is unlimited by default.
    """

    mechanisms: Optional[List[str]] = None
    baselines: Tuple[str, ...] = BASELINES
    patterns: Optional[List[str]] = None
    lengths: Tuple[int, ...] = DEFAULT_LENGTHS
    modes: Tuple[str, ...] = MODES
    batch: int = 1
    heads: int = 8
    dim: int = 64
    dtypes: Tuple[str, ...] = ("float32",)
    devices: Tuple[str, ...] = ("cpu",)
    warmup: int = 1
    repeats: int = 5
    budget: float = 1.0
    max_memory_gib: Optional[float] = None
    timeout: Optional[float] = None
    options: Dict[str, Dict[str, object]] = field(default_factory=dict)  # mechanism -> constructor overrides
    max_time: Optional[float] = None
    isolation: str = "subprocess"
    imports: Tuple[str, ...] = ()
    threads: Optional[int] = None
    seed: int = 0

    def validate(self, extra: Optional[Mapping[str, Type[EfficientAttention]]] = None) -> None:
        for name in ("batch", "heads", "dim", "repeats"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.lengths or any(int(n) <= 0 for n in self.lengths):
            raise ValueError(f"lengths must be positive integers, got {self.lengths!r}")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"max_time must be positive, got {self.max_time}")
        if self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; use {', '.join(MODES)}")
        for dt in self.dtypes:
            if dt not in DTYPES:
                raise ValueError(f"unknown dtype {dt!r}; use {', '.join(DTYPES)}")
        for dev in self.devices:
            if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {dev!r} asked for but CUDA is not available")
        if self.isolation not in ("subprocess", "none"):
            raise ValueError(f"isolation must be 'subprocess' or 'none', got {self.isolation!r}")
        for p in self.patterns or ():
            parse_pattern(p)
        import_modules(self.imports)  # they may register the mechanisms named below
        for name in list(self.mechanisms or ()) + list(self.baselines):
            try:
                resolve_mechanism(name, extra)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        for name, opts in self.options.items():
            known = resolve_mechanism(name, extra).options()
            for key in opts:
                if key not in known:
                    raise ValueError(f"{name} has no option {key!r}; its options: {', '.join(known) or 'none'}")
            self.options[name] = {key: _convert_option(known[key], value, name) for key, value in opts.items()}


def _convert_option(spec: Option, value, mechanism: str):
    """A ``--option`` value (text, or a typed value given in Python) as the option's type (its spec says how)."""
    try:
        return spec.convert(value)
    except ValueError as err:
        raise ValueError(f"--option {mechanism}.{spec.name}: {err}") from None


# ------------------------------------------------------------ machine info
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(devices: Sequence[str] = ("cpu",)) -> dict:
    """Where the numbers come from: devices, CPU, threads and versions."""
    from .. import __version__

    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "memory_total_bytes": _meminfo("MemTotal"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": _loadavg(),
        "efficient_attention": __version__,
        "git_commit": _git_commit(),
        "devices": {},
    }
    for dev in devices:
        d = torch.device(dev)
        if d.type == "cuda":
            props = torch.cuda.get_device_properties(d)
            info["devices"][dev] = {
                "name": props.name,
                "memory_total_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            }
        else:
            info["devices"][dev] = {"name": info["cpu"], "memory_total_bytes": info["memory_total_bytes"]}
    return info


# ------------------------------------------------------------------ plan
def plan_series(config: SweepConfig, extra: Optional[Mapping[str, Type[EfficientAttention]]] = None) -> List[dict]:
    """Every series (device, dtype, pattern, mode, mechanism) the config asks for and the class supports."""
    names = list(available_attentions()) if config.mechanisms is None else list(config.mechanisms)
    if config.mechanisms is None and extra:
        names += [n for n in extra if n not in names]
    names = list(config.baselines) + [n for n in names if n not in config.baselines]
    patterns = [parse_pattern(p) for p in config.patterns] if config.patterns else list(Pattern)
    series = []
    for device in config.devices:
        for dtype in config.dtypes:
            for pattern in patterns:
                for mode in config.modes:
                    for name in names:
                        cls = resolve_mechanism(name, extra)
                        if not cls.capabilities.supports(pattern) or mode not in applicable_modes(cls, pattern):
                            continue
                        series.append(
                            dict(mechanism=name, pattern=pattern.value, mode=mode, dtype=dtype, device=device)
                        )
    return series


def _growth(points: List[dict], key: str, lo: float, hi: float, default: float) -> Tuple[Optional[dict], float]:
    """The last ok point of a series and the log-log growth of ``key`` between its last two ok points."""
    ok = [p for p in points if p["status"] == "ok" and p.get(key)]
    if not ok:
        return None, default
    if len(ok) < 2:
        return ok[-1], default
    a, b = ok[-2], ok[-1]
    exp = math.log(b[key] / a[key]) / math.log(b["length"] / a["length"]) if b[key] > 0 and a[key] > 0 else default
    return b, min(hi, max(lo, exp))


def _skip_reason(
    done: List[dict], length: int, config: SweepConfig, device: str, max_memory: Optional[float]
) -> Optional[Tuple[str, str]]:
    for p in done:
        if p["status"] == "oom":
            return "oom", f"out of memory at length {p['length']}"
        if p.get("reason") == "crash":
            return "after failure", f"the worker crashed at length {p['length']}"
        if p["status"] == "skipped" and p.get("reason") in ("budget", "memory"):
            return p["reason"], p.get("detail", "")
        if p["status"] == "ok" and p["cost_s"] > config.budget:
            return "budget", f"a call took {p['cost_s']:.3g} s > budget {config.budget:g} s at length {p['length']}"
    last, exp = _growth(done, "cost_s", 1.0, 2.5, 2.0)
    if last is not None:
        predicted = last["cost_s"] * (length / last["length"]) ** exp
        if predicted > 4 * config.budget:
            return "budget", f"predicted {predicted:.3g} s per call > 4 x budget {config.budget:g} s"
    if max_memory is not None and torch.device(device).type == "cpu":
        last, exp = _growth(done, "mem_peak_bytes", 1.0, 2.0, 2.0)
        if last is not None:
            predicted = (
                last["mem_peak_bytes"] * (length / last["length"]) ** exp
                + last["mem_live_bytes"] * length / last["length"]
            )
            if predicted > max_memory:
                return "memory", f"predicted peak {predicted / 2**30:.3g} GiB > max memory {max_memory / 2**30:.3g} GiB"
    return None


# ------------------------------------------------------------------- run
def run_sweep(
    config: SweepConfig,
    extra: Optional[Mapping[str, Type[EfficientAttention]]] = None,
    checkpoint: Optional[Path] = None,
) -> dict:
    """Run the sweep and return the results (JSON-able dict).

    ``extra`` maps names to unregistered mechanism classes (only with
    ``isolation="none"``); ``checkpoint``, if given, is rewritten with the
    results so far after every series.
    """
    config.validate(extra)
    if extra and config.isolation != "none":
        raise ValueError(
            "unregistered mechanism classes (extra) need isolation='none'; register them in a module and use imports"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    import_modules(config.imports)
    series = plan_series(config, extra)
    lengths = sorted({int(n) for n in config.lengths})
    max_memory = config.max_memory_gib * 2**30 if config.max_memory_gib else None
    if max_memory is None and "cpu" in [torch.device(d).type for d in config.devices]:
        avail = _meminfo("MemAvailable")
        max_memory = avail / 2 if avail else None
    timeout = config.timeout if config.timeout else max(120.0, 30 * config.budget)
    runner = (
        InProcessRunner(extra)
        if config.isolation == "none"
        else SubprocessRunner(config.imports, config.threads, timeout)
    )
    result: Dict[str, Any] = {
        "schema": SCHEMA,
        "machine": machine_info(config.devices),
        "config": {**asdict(config), "lengths": lengths, "max_memory_bytes": max_memory, "timeout": timeout},
        "mechanisms": _mechanism_info(series, extra, config.options),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "points": [],
    }
    load = result["machine"]["load_average"]
    if load and "cpu" in config.devices and load[0] > 0.5 * (os.cpu_count() or 1):
        logger.warning(
            "the machine is busy (load average %s on %s cores): CPU timings will be noisy", load, os.cpu_count()
        )
    total, index, t_start = len(series) * len(lengths), 0, time.perf_counter()
    logger.info("sweep: %d series x %d lengths = %d points", len(series), len(lengths), total)
    try:
        for s in series:
            done: List[dict] = []
            for length in lengths:
                index += 1
                point = dict(
                    s,
                    length=length,
                    batch=config.batch,
                    heads=config.heads,
                    dim=config.dim,
                    warmup=config.warmup,
                    repeats=config.repeats,
                    budget=config.budget,
                    seed=config.seed,
                    options=dict(config.options.get(s["mechanism"], {})),
                )
                skip = _skip_reason(done, length, config, s["device"], max_memory)
                if skip is None and config.max_time and time.perf_counter() - t_start > config.max_time:
                    skip = ("time limit", f"the sweep passed its {config.max_time:g} s limit (--max-time)")
                if skip is not None:
                    res = {"status": "skipped", "reason": skip[0], "detail": skip[1]}
                else:
                    res = runner.run(point)
                rec = {
                    **{
                        k: point[k]
                        for k in ("mechanism", "pattern", "mode", "length", "dtype", "device", "batch", "heads", "dim")
                    },
                    **res,
                }
                done.append(rec)
                result["points"].append(rec)
                _log_point(index, total, time.perf_counter() - t_start, rec, config.max_time)
            if checkpoint is not None:
                _write_json(result, checkpoint)
    finally:
        runner.close()
    result["elapsed_s"] = time.perf_counter() - t_start
    result["load_average_end"] = _loadavg()
    result["efficiency"] = efficiency_lengths(result["points"], config.baselines)
    return result


def _mechanism_info(series: List[dict], extra, overrides: Mapping[str, Mapping[str, object]]) -> Dict[str, dict]:
    out = {}
    for name in dict.fromkeys(s["mechanism"] for s in series):
        cls = resolve_mechanism(name, extra)
        opts = {k: v.default for k, v in cls.options().items()}
        opts.update(overrides.get(name, {}))
        out[name] = {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "baseline": name in BASELINES,
            "options": {k: repr(v) for k, v in opts.items()},
            "overridden": sorted(overrides.get(name, {})),
            "constant_state": cls.capabilities.constant_state,
        }
    return out


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def eta_seconds(index: int, total: int, elapsed: float, max_time: Optional[float] = None) -> float:
    """Time left: the mean time per point so far times the points left, at most what ``max_time`` leaves."""
    left = elapsed / max(index, 1) * (total - index)
    return min(left, max(0.0, max_time - elapsed)) if max_time else left


def _log_point(index: int, total: int, elapsed: float, rec: dict, max_time: Optional[float] = None) -> None:
    eta = _duration(eta_seconds(index, total, elapsed, max_time))
    head = (
        f"[{index}/{total} {_duration(elapsed)}, ETA {eta}] {rec['mechanism']} {rec['pattern']} {rec['mode']} "
        f"{rec['dtype']} {rec['device']} L={rec['length']}"
    )
    if rec["status"] == "ok":
        logger.info("%s: %.3g ms, peak %.3g MiB", head, rec["time_s"] * 1e3, rec["mem_peak_bytes"] / 2**20)
    elif rec["status"] == "skipped":
        logger.debug("%s: skipped (%s)", head, rec.get("reason"))
    else:
        logger.info("%s: %s (%s)", head, rec["status"], rec.get("detail", ""))


def _write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)
