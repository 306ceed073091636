"""Efficiency length: the sequence length from which a mechanism beats a baseline.

For a mechanism, a baseline and a metric (time or memory) in one setting
(device, dtype, pattern, mode), two estimates are given:

* **fitted** -- as the CAB benchmark did: each curve is fitted by a polynomial
  in the length ``n``, quadratic ``a + b n + c n²`` for a quadratic curve and
  linear ``a + b n`` otherwise, and the crossing is solved for.  A curve counts
  as quadratic when its measured log-log slope over its last (up to three)
  points is above 1.5; the fit minimises *relative* residuals (weights
  ``1/y``), so short lengths count as much as long ones.  The efficiency length
  is the largest positive root of ``baseline(n) - mechanism(n)`` when the
  mechanism is cheaper for every longer length; ``always`` when it is cheaper
  at every positive length, ``never`` when the baseline is cheaper
  asymptotically.  A root outside the measured lengths is flagged
  ``extrapolated``.
* **measured** -- read from the points: the shortest measured length from which
  the mechanism is cheaper at every longer measured length, the crossing placed
  by log-log interpolation of the cost ratio between that length and the one
  below it.  A baseline that ran out of memory where the mechanism ran counts
  as beaten there; one skipped for budget (or the CPU memory cap) counts as
  beaten if the mechanism ran cheaper than the baseline's cost at the longest
  length it did run; ``always`` if the mechanism is cheaper from the first
  length, ``none`` if not at the longest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "Fit",
    "Crossing",
    "choose_degree",
    "fit_curve",
    "fitted_crossing",
    "measured_crossing",
    "efficiency_lengths",
    "METRICS",
]

METRICS = {"time": "time_s", "memory": "mem_peak_bytes"}
_QUADRATIC_SLOPE = 1.5


@dataclass(frozen=True)
class Fit:
    degree: int
    coeffs: Tuple[float, ...]  # ascending: a, b[, c]

    def __call__(self, n) -> np.ndarray:
        return np.polynomial.polynomial.polyval(np.asarray(n, dtype=float), self.coeffs)


@dataclass(frozen=True)
class Crossing:
    """``status``: ``at`` (``length`` is set), ``always``, ``never``/``none``, or ``n/a`` (too few points)."""

    status: str
    length: Optional[float] = None
    extrapolated: bool = False
    first_length: Optional[int] = None  # measured: first length from which the mechanism stays cheaper

    def as_dict(self) -> dict:
        return asdict(self)


def choose_degree(lengths: Iterable[float], values: Iterable[float]) -> int:
    """2 if the log-log slope over the last (up to) three points is above 1.5, else 1."""
    pts = [(n, y) for n, y in zip(lengths, values) if y > 0][-3:]
    if len(pts) < 2:
        return 1
    (n0, y0), (n1, y1) = pts[0], pts[-1]
    slope = math.log(y1 / y0) / math.log(n1 / n0)
    return 2 if slope > _QUADRATIC_SLOPE else 1


def fit_curve(lengths: Sequence[float], values: Sequence[float], degree: Optional[int] = None) -> Optional[Fit]:
    """Least-squares polynomial fit with relative residuals; ``None`` with fewer than two points."""
    n = np.asarray(lengths, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(n) < 2:
        return None
    degree = choose_degree(n, y) if degree is None else degree
    degree = min(degree, len(n) - 1)
    w = 1.0 / np.maximum(np.abs(y), np.finfo(float).tiny)
    scale = n.max()  # solve in n / scale for conditioning
    vander = np.vander(n / scale, degree + 1, increasing=True) * w[:, None]
    sol, *_ = np.linalg.lstsq(vander, y * w, rcond=None)
    coeffs = tuple(float(c) / scale**i for i, c in enumerate(sol))
    return Fit(degree, coeffs)


def fitted_crossing(mech: Fit, base: Fit, measured: Sequence[float] = ()) -> Crossing:
    """Where ``base(n) - mech(n)`` turns and stays positive (see the module docstring)."""
    size = max(len(mech.coeffs), len(base.coeffs))
    d = np.zeros(size)
    d[: len(base.coeffs)] += base.coeffs
    d[: len(mech.coeffs)] -= mech.coeffs
    # drop leading terms that are zero up to rounding at the lengths of interest
    ref = float(max(measured)) if len(measured) else 1.0
    mag = max(abs(float(base(ref))), abs(float(mech(ref))), float(np.finfo(float).tiny))
    while len(d) > 1 and abs(d[-1]) * ref ** (len(d) - 1) <= 1e-9 * mag:
        d = d[:-1]
    if d[-1] <= 0:
        return Crossing("never")
    if len(d) == 1:
        return Crossing("always")
    roots = np.roots(d[::-1])
    real = [r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r))]
    positive = [r for r in real if r > 0]
    if not positive:
        return Crossing("always")
    root = max(positive)
    extrapolated = bool(len(measured)) and not (min(measured) <= root <= max(measured))
    return Crossing("at", float(root), extrapolated)


def measured_crossing(
    lengths: Sequence[int],
    mech: Sequence[Optional[float]],
    base: Sequence[Optional[float]],
    base_bound: Sequence[Optional[float]] = (),
) -> Crossing:
    """The measured crossing.

    ``mech[i]`` / ``base[i]`` are the costs at ``lengths[i]`` (``None`` where not
    measured).  Where the baseline was not measured, ``base_bound[i]`` may give
    a lower bound of its cost: ``inf`` where it ran out of memory, its cost at
    the longest shorter length where it was skipped for budget or memory
    (costs grow with length).  The mechanism wins there if it ran cheaper than
    the bound; otherwise that length is left out.
    """
    base_bound = list(base_bound) or [None] * len(lengths)
    outcome: List[Tuple[int, bool, Optional[float]]] = []  # (length, mechanism wins, cost ratio)
    for n, m, b, bound in sorted(zip(lengths, mech, base, base_bound), key=lambda t: t[0]):
        if m is None:
            continue
        if b is not None:
            ratio = m / b if b > 0 else math.inf
            outcome.append((n, ratio < 1.0, ratio))
        elif bound is not None and m < bound:
            outcome.append((n, True, None))
    if not outcome:
        return Crossing("n/a")
    if not outcome[-1][1]:
        return Crossing("none")
    first = len(outcome) - 1
    while first > 0 and outcome[first - 1][1]:
        first -= 1
    n1, _, r1 = outcome[first]
    if first == 0:
        return Crossing("always", None, False, n1)
    n0, _, r0 = outcome[first - 1]
    if r0 is None or r1 is None or r1 <= 0 or r0 <= 0 or not math.isfinite(r0):
        return Crossing("at", float(n1), False, n1)
    # log-log interpolation of the ratio between n0 (ratio >= 1) and n1 (ratio < 1)
    t = math.log(r0) / (math.log(r0) - math.log(r1))
    return Crossing("at", float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))), False, n1)


def _series(points: List[dict]) -> Dict[tuple, Dict[str, Dict[int, dict]]]:
    out: Dict[tuple, Dict[str, Dict[int, dict]]] = {}
    for p in points:
        key = (p["device"], p["dtype"], p["pattern"], p["mode"])
        out.setdefault(key, {}).setdefault(p["mechanism"], {})[p["length"]] = p
    return out


def _bounds(base: Dict[int, dict], key: str, lengths: Sequence[int]) -> List[Optional[float]]:
    """Lower bounds of the baseline's cost where it did not run (see :func:`measured_crossing`)."""
    out: List[Optional[float]] = []
    last_ok: Optional[float] = None
    for n in lengths:
        p = base.get(n)
        if p is not None and p["status"] == "ok":
            last_ok = p[key]
        if p is None or p["status"] == "ok":
            out.append(None)
        elif p["status"] == "oom" or p.get("reason") == "oom":
            out.append(math.inf)
        elif p["status"] == "skipped" and p.get("reason") in ("budget", "memory"):
            out.append(last_ok)
        else:
            out.append(None)
    return out


def efficiency_lengths(points: List[dict], baselines: Sequence[str]) -> List[dict]:
    """Fitted and measured crossings of every mechanism against every baseline, for time and memory."""
    rows = []
    for (device, dtype, pattern, mode), mechs in _series(points).items():
        for base_name in baselines:
            base = mechs.get(base_name)
            if base is None:
                continue
            for name, pts in mechs.items():
                # every mechanism against every baseline; baselines only against the later (slower) ones
                if name == base_name or (
                    name in baselines and list(baselines).index(name) > list(baselines).index(base_name)
                ):
                    continue
                row = dict(mechanism=name, baseline=base_name, device=device, dtype=dtype, pattern=pattern, mode=mode)
                lengths = sorted(set(pts) | set(base))
                for metric, key in METRICS.items():
                    m_ok = {n: p[key] for n, p in pts.items() if p["status"] == "ok"}
                    b_ok = {n: p[key] for n, p in base.items() if p["status"] == "ok"}
                    measured = measured_crossing(
                        lengths,
                        [m_ok.get(n) for n in lengths],
                        [b_ok.get(n) for n in lengths],
                        _bounds(base, key, lengths),
                    )
                    mfit = fit_curve(sorted(m_ok), [m_ok[n] for n in sorted(m_ok)])
                    bfit = fit_curve(sorted(b_ok), [b_ok[n] for n in sorted(b_ok)])
                    if mfit is None or bfit is None:
                        fitted = Crossing("n/a")
                    else:
                        fitted = fitted_crossing(mfit, bfit, sorted(set(m_ok) | set(b_ok)))
                    row[metric] = {
                        "fitted": fitted.as_dict(),
                        "measured": measured.as_dict(),
                        "fit_degree": {
                            "mechanism": mfit.degree if mfit else None,
                            "baseline": bfit.degree if bfit else None,
                        },
                    }
                rows.append(row)
    return rows
