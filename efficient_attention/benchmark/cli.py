"""Command line of the benchmark (``python -m efficient_attention.benchmark``, ``efficient-attention-bench``).

Progress (with an estimate of the time left) goes to stderr through
``logging``; the efficiency-length table is printed on stdout at the end;
everything is written under ``--out``.  List options take comma-separated
values, space-separated values, or both (``--mechanisms local performer``,
``--mechanisms local,performer``).  The exit status is 1 when every point
failed, or every point of the mechanisms asked for (the baselines aside), so
a script notices a sweep that measured nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .measure import DTYPES, MODES
from .report import efficiency_table, write_outputs
from .sweep import BASELINES, DEFAULT_LENGTHS, SweepConfig, run_sweep

__all__ = ["main", "build_parser", "parse_lengths", "parse_option", "config_from_args", "all_failed"]


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _Items(argparse.Action):
    """A list option: one or more arguments, each of them comma-separated items (parsed by ``parse``)."""

    def __init__(self, option_strings, dest, parse=_csv, **kwargs):
        self.parse = parse
        super().__init__(option_strings, dest, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = []
        for value in values:
            try:
                items.extend(self.parse(value))
            except argparse.ArgumentTypeError as exc:
                parser.error(str(exc))
        setattr(namespace, self.dest, items)


def parse_lengths(text: str) -> List[int]:
    """``"256,1024"`` or ``"256:16384"`` (doubling from the first to the last)."""
    try:
        if ":" in text:
            lo, hi = (int(t) for t in text.split(":"))
            if lo <= 0 or hi < lo:
                raise ValueError
            out = []
            while lo <= hi:
                out.append(lo)
                lo *= 2
            return out
        out = [int(t) for t in _csv(text)]
        if not out or min(out) <= 0:
            raise ValueError
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lengths: expected 'N,N,...' or 'MIN:MAX' of positive integers, got {text!r}"
        ) from None


def parse_option(text: str):
    """``"mechanism.key=value"`` -> ``("mechanism", "key", "value")``.

    The value stays text here: :meth:`SweepConfig.validate` converts it with the option's spec
    (:meth:`efficient_attention.options.Option.convert`) once ``--import`` has registered every mechanism.
    """
    head, sep, raw = text.partition("=")
    name, dot, key = head.partition(".")
    if not (sep and dot and name.strip() and key.strip()):
        raise argparse.ArgumentTypeError(f"--option: expected MECHANISM.KEY=VALUE, got {text!r}")
    return name.strip().lower().replace("-", "_"), key.strip(), raw.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="efficient-attention-bench",
        description="Time, memory and efficiency length of the registered attention mechanisms.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--mechanisms",
        action=_Items,
        default=None,
        help="names (default: every registered one); the baselines are always added",
    )
    p.add_argument(
        "--baselines",
        action=_Items,
        default=list(BASELINES),
        help="baselines to compare with: 'vanilla' (SDPA path) and/or 'naive' (unfused)",
    )
    p.add_argument(
        "--patterns",
        action=_Items,
        default=None,
        help="e.g. causal-self noncausal-self noncausal-cross causal-cross (default: all)",
    )
    p.add_argument(
        "--lengths",
        action=_Items,
        parse=parse_lengths,
        default=list(DEFAULT_LENGTHS),
        help="'N N ...', 'N,N,...' or 'MIN:MAX' doubling",
    )
    p.add_argument(
        "--modes", action=_Items, default=list(MODES), help="forward, backward (forward+backward), decode (one step)"
    )
    p.add_argument(
        "--option",
        dest="options",
        type=parse_option,
        action="append",
        default=[],
        metavar="MECH.KEY=VALUE",
        help="override a mechanism's constructor option (repeatable), e.g. cosformer.max_len=16385",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="head dimension (embed_dim = heads * dim)")
    p.add_argument("--dtype", action=_Items, default=["float32"], help=f"one or more of: {', '.join(DTYPES)}")
    p.add_argument("--device", action=_Items, default=["cpu"], help="one or more, e.g. cpu cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="seconds per call: longer lengths of a mechanism are skipped once a call takes longer",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        help="CPU only: GiB a point may be predicted to use (default: half the available memory)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds after which a point's worker is killed (default: max(120, 30 x budget))",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="seconds for the whole sweep; points left after it are recorded as skipped (time limit)",
    )
    p.add_argument(
        "--isolation",
        choices=("subprocess", "none"),
        default="subprocess",
        help="run points in a worker process that may crash, or in this process",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action=_Items,
        default=[],
        help="modules to import first (they may register more mechanisms)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    p.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="re-write the Markdown and plots from an existing results.json into --out",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: log skipped points too; -vv: debug")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    options: Dict[str, Dict[str, object]] = {}
    for name, key, value in args.options:
        options.setdefault(name, {})[key] = value
    return SweepConfig(
        options=options,
        mechanisms=args.mechanisms,
        baselines=tuple(args.baselines),
        patterns=args.patterns,
        lengths=tuple(args.lengths),
        modes=tuple(args.modes),
        batch=args.batch,
        heads=args.heads,
        dim=args.dim,
        dtypes=tuple(args.dtype),
        devices=tuple(args.device),
        warmup=args.warmup,
        repeats=args.repeats,
        budget=args.budget,
        max_memory_gib=args.max_memory,
        timeout=args.timeout,
        max_time=args.max_time,
        isolation=args.isolation,
        imports=tuple(args.imports),
        threads=args.threads,
        seed=args.seed,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.INFO if args.verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if args.verbose < 2:
        logging.getLogger("efficient_attention.benchmark.measure").setLevel(max(level, logging.INFO))
    if args.report_only is not None:
        result = json.loads(args.report_only.read_text())
    else:
        try:
            config = config_from_args(args)
            config.validate()
        except (ValueError, KeyError) as exc:
            build_parser().error(str(exc))
        result = run_sweep(config, checkpoint=args.out / "results.json")
    paths = write_outputs(result, args.out)
    print(efficiency_table(result))
    print(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plots", file=sys.stderr)
    failed = all_failed(result)
    if failed and args.report_only is None:
        print(f"error: {failed} (the reasons are in {paths['json']})", file=sys.stderr)
        return 1
    return 0


def all_failed(result: dict) -> Optional[str]:
    """Why a sweep measured nothing useful -- every point failed, or every point of the mechanisms asked
    for (the baselines aside) -- else ``None``."""
    points = result.get("points", [])
    if not points:
        return "the sweep has no points"
    if not any(p["status"] == "ok" for p in points):
        return "every point failed or was skipped"
    baselines = set(result.get("config", {}).get("baselines", ()))
    mine = [p for p in points if p["mechanism"] not in baselines]
    if mine and not any(p["status"] == "ok" for p in mine):
        names = ", ".join(dict.fromkeys(p["mechanism"] for p in mine))
        return f"every point of {names} failed or was skipped"
    return None
