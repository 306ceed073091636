"""Writing a sweep's results: JSON, a Markdown report and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["write_outputs", "write_json", "markdown_report", "efficiency_table", "plot_results", "figure_title"]

_MODE_TITLES = {"forward": "forward", "backward": "forward + backward", "decode": "decoding step"}


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)
    return path


def write_outputs(result: dict, out_dir) -> Dict[str, Any]:
    """``results.json``, ``results.md`` and the plots under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, object] = {"json": write_json(result, out_dir / "results.json")}
    try:
        plots = plot_results(result, out_dir)
    except ImportError as exc:  # matplotlib is optional: re-render later with --report-only
        logger.warning("no plots (%s); install matplotlib and re-run with --report-only %s", exc, paths["json"])
        plots = []
    md = out_dir / "results.md"
    md.write_text(markdown_report(result, [p.name for p in plots]))
    paths["markdown"] = md
    paths["plots"] = plots
    return paths


# ------------------------------------------------------------- formatting
def _fmt_len(x: Optional[float]) -> str:
    if x is None:
        return "?"
    if x >= 1e6:
        return f"{x:.2g}"
    return f"{x:,.0f}"


def _fmt_crossing(c: dict, measured: bool) -> str:
    status = c["status"]
    if status == "at":
        text = _fmt_len(c["length"])
        return text + ("*" if c.get("extrapolated") else "")
    if status == "always":
        return f"always (≤{c['first_length']:,})" if measured and c.get("first_length") else "always"
    if status == "none":
        return "none"
    return status


def _fmt_time(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _fmt_mem(b: float) -> str:
    return f"{b / 2**20:.3g}" if b < 1000 * 2**20 else f"{b / 2**20:,.0f}"


def _cell(p: Optional[dict], key: str) -> str:
    if p is None:
        return ""
    if p["status"] == "ok":
        return _fmt_time(p[key]) if key == "time_s" else _fmt_mem(p[key])
    if p["status"] == "skipped":
        return p.get("reason", "skipped")
    return p["status"]


def efficiency_table(result: dict) -> str:
    """Markdown: one row per mechanism/setting; each cell ``fitted (measured)`` efficiency length."""
    rows = result.get("efficiency", [])
    if not rows:
        return "_no efficiency lengths (no baseline or no mechanism measured)_\n"
    baselines = list(dict.fromkeys(r["baseline"] for r in rows))
    head = ["mechanism", "device", "dtype", "pattern", "mode"] + [
        f"{m} vs {b}" for b in baselines for m in ("time", "memory")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    grouped: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        key = (r["mechanism"], r["device"], r["dtype"], r["pattern"], r["mode"])
        grouped.setdefault(key, {})[r["baseline"]] = r
    for key, by_base in grouped.items():
        cells = [f"`{key[0]}`", *key[1:]]
        for b in baselines:
            r = by_base.get(b)
            for m in ("time", "memory"):
                if r is None:
                    cells.append("")
                else:
                    cells.append(f"{_fmt_crossing(r[m]['fitted'], False)} ({_fmt_crossing(r[m]['measured'], True)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _points_table(points: List[dict], lengths: List[int], key: str) -> str:
    mechs: Dict[str, Dict[int, dict]] = {}
    for p in points:
        mechs.setdefault(p["mechanism"], {})[p["length"]] = p
    head = ["mechanism"] + [f"{n:,}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_len in mechs.items():
        lines.append("| " + " | ".join([f"`{name}`"] + [_cell(by_len.get(n), key) for n in lengths]) + " |")
    return "\n".join(lines) + "\n"


def _groups(points: List[dict]) -> Dict[tuple, List[dict]]:
    out: Dict[tuple, List[dict]] = {}
    for p in points:
        out.setdefault((p["device"], p["dtype"], p["pattern"], p["mode"]), []).append(p)
    return out


def markdown_report(result: dict, plot_names: Sequence[str] = ()) -> str:
    m, c = result["machine"], result["config"]
    lengths = list(c["lengths"])
    devs = "; ".join(f"{k}: {v['name']}" for k, v in m["devices"].items())
    out = [
        "# Attention benchmark\n",
        f"Machine: {devs}; CPU {m['cpu']} ({m['cpu_count']} cores, {m['threads']} torch threads); "
        f"torch {m['torch']} (CUDA {m['cuda']}); efficient-attention {m['efficient_attention']} "
        f"(commit {str(m.get('git_commit'))[:12]}); started {result.get('started')}, "
        f"{result.get('elapsed_s', 0):.0f} s; load average {m.get('load_average')} at the start, "
        f"{result.get('load_average_end')} at the end.\n",
        f"Sizes: batch {c['batch']}, {c['heads']} heads x {c['dim']} dims (embed {c['heads'] * c['dim']}); "
        f"keys as long as queries in cross patterns. Median of {c['repeats']} calls after {c['warmup']} warm-up; "
        f"budget {c['budget']} s per call.\n",
        "## Efficiency length\n",
        "The sequence length from which the mechanism is faster (time) or smaller (memory) than the baseline: "
        "fitted crossing (`*` = extrapolated beyond the measured lengths), and in brackets the crossing read "
        "from the measured points. `always`: cheaper at every length; `never`: the baseline is cheaper "
        "asymptotically; `none`: not cheaper at the longest measured length. See benchmarks/README.md.\n",
        efficiency_table(result),
    ]
    if plot_names:
        out.append("## Plots\n")
        out.extend(f"![{n}]({n})\n" for n in plot_names)
    out.append("## Points\n")
    out.append(
        "Time in ms (median), peak memory in MiB on top of parameters and inputs. `oom`: out of memory; "
        "`budget`: skipped after a slower shorter length; `memory`: skipped, predicted to exceed the memory cap; "
        "`time limit`: not reached within --max-time; `error`: the mechanism raised (see the JSON).\n"
    )
    for (device, dtype, pattern, mode), pts in _groups(result["points"]).items():
        label = "context length" if mode == "decode" else "length"
        out.append(f"### {_MODE_TITLES.get(mode, mode)}, {pattern}, {dtype}, {device} (columns: {label})\n")
        out.append("Time (ms)\n\n" + _points_table(pts, lengths, "time_s"))
        out.append("Peak memory (MiB)\n\n" + _points_table(pts, lengths, "mem_peak_bytes"))
    return "\n".join(out)


# ------------------------------------------------------------------ plots
_COLOR_ORDER = list(range(0, 20, 2)) + list(range(1, 20, 2))


def _style(names: List[str]):
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    markers = "osD^v<>ph*"
    styles = {}
    k = 0
    for name in names:
        if name == "vanilla":
            styles[name] = dict(color="black", linestyle="-", marker="o", linewidth=2.2)
        elif name == "naive":
            styles[name] = dict(color="black", linestyle="--", marker="x", linewidth=2.0)
        else:
            color = cmap(_COLOR_ORDER[k % 20])  # the 10 saturated colours first, then their light pairs
            styles[name] = dict(color=color, linestyle="-", marker=markers[k % len(markers)], linewidth=1.2)
            k += 1
    return styles


def setting_text(result: dict) -> str:
    """The sizes and the measurement of a sweep in one line (for plot titles)."""
    c = result.get("config", {})
    parts = []
    if c.get("batch"):
        parts.append(f"batch {c['batch']}, {c.get('heads')} heads x {c.get('dim')} dims")
    if c.get("repeats"):
        parts.append(f"median of {c['repeats']} calls after {c.get('warmup', 0)} warm-up")
    threads = result.get("machine", {}).get("threads")
    if threads:
        parts.append(f"{threads} CPU threads")
    return "; ".join(parts)


def figure_title(result: dict, kind: str, device: str, dtype: str) -> str:
    """``"<what>: <device name>, <dtype>"`` and, on a second line, the setting."""
    what = {"time": "Time", "memory": "Peak memory", "decode": "Decoding-step latency"}.get(kind, kind)
    dev_name = result.get("machine", {}).get("devices", {}).get(device, {}).get("name", device)
    return f"{what}: {dev_name}, {dtype}\n{setting_text(result)}"


def _length_label(x: float, _pos=None) -> str:
    return f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"


def plot_results(result: dict, out_dir) -> List[Path]:
    """Log-log plots per (device, dtype): time and memory vs length (rows: forward,
    forward+backward; columns: patterns) and decoding-step latency vs context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    out_dir = Path(out_dir)
    lengths = sorted({p["length"] for p in result["points"]})
    groups = _groups(result["points"])
    names = list(dict.fromkeys(p["mechanism"] for p in result["points"]))
    styles = _style(names)
    paths = []
    for device, dtype in dict.fromkeys((k[0], k[1]) for k in groups):
        patterns = list(dict.fromkeys(k[2] for k in groups if k[:2] == (device, dtype)))
        for kind, modes, key, ylabel in (
            ("time", ("forward", "backward"), "time_s", "time (ms)"),
            ("memory", ("forward", "backward"), "mem_peak_bytes", "peak memory (MiB)"),
            ("decode", ("decode",), "time_s", "step latency (ms)"),
        ):
            cells = [(mode, pat) for mode in modes for pat in patterns if (device, dtype, pat, mode) in groups]
            if not cells:
                continue
            rows = [mode for mode in modes if any(c[0] == mode for c in cells)]
            cols = [pat for pat in patterns if any(c[1] == pat for c in cells)]
            legend_w = 2.4
            fig, axes = plt.subplots(
                len(rows), len(cols), figsize=(5.0 * len(cols) + legend_w, 4.2 * len(rows) + 0.8), squeeze=False
            )
            for i, mode in enumerate(rows):
                for j, pat in enumerate(cols):
                    ax = axes[i][j]
                    pts = groups.get((device, dtype, pat, mode), [])
                    _plot_cell(ax, pts, key, styles)
                    ax.set_title(f"{_MODE_TITLES[mode]}, {pat}", fontsize=10)
                    ax.set_xlabel("context length" if mode == "decode" else "sequence length", fontsize=9)
                    ax.set_ylabel(ylabel, fontsize=9)
                    ax.set_xticks(lengths)
                    ax.xaxis.set_major_formatter(FuncFormatter(_length_label))
                    ax.xaxis.set_minor_formatter(NullFormatter())
                    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
            handles: Dict[str, Any] = {}
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, h)
            fig.legend(
                list(handles.values()),
                list(handles),
                loc="center right",
                fontsize=8,
                frameon=False,
                title="X: out of memory",
                title_fontsize=7,
            )
            fig.suptitle(figure_title(result, kind, device, dtype), fontsize=11)
            fig.tight_layout(rect=(0, 0, 1 - legend_w / fig.get_figwidth(), 1 - 0.6 / fig.get_figheight()))
            path = out_dir / f"{kind}_{device.replace(':', '')}_{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def _plot_cell(ax, pts: List[dict], key: str, styles) -> None:
    by_mech: Dict[str, List[dict]] = {}
    for p in pts:
        by_mech.setdefault(p["mechanism"], []).append(p)
    for name, series in by_mech.items():
        ok = sorted((p["length"], p[key]) for p in series if p["status"] == "ok" and p.get(key, 0) > 0)
        if not ok:
            continue
        xs, ys = zip(*ok)
        scale = 1e3 if key == "time_s" else 1 / 2**20
        ax.plot(xs, [y * scale for y in ys], label=name, markersize=3.5, **styles[name])
        oom = [p["length"] for p in series if p["status"] == "oom"]
        if oom:  # mark where a series ran out of memory
            ax.plot(
                oom,
                [ys[-1] * scale] * len(oom),
                linestyle="none",
                marker="X",
                color=styles[name]["color"],
                markersize=7,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.tick_params(labelsize=8)
