"""``python -m efficient_attention [table | info | options [NAME ...]]``.

``table`` (the default) prints the Markdown table of mechanisms, patterns and backends that the
README holds; ``info`` prints versions, which kernel backends are usable here and why not, and
per mechanism what it supports and which fast paths it gets here; ``options`` prints every
option of every mechanism (or of the named ones): type, default, rule and help, from the option spec.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m efficient_attention",
        description="Efficient attention mechanisms with fairseq's interface: what is registered and what runs here.",
        epilog="Benchmarks: python -m efficient_attention.benchmark --help. Choosing a mechanism: docs/choosing.md.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="table",
        choices=("table", "info", "options"),
        help="table: the mechanism table of the README (default); "
        "info: versions, kernel backends usable here (and why not), mechanisms; "
        "options: each mechanism's options (type, default, rule, help)",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="options: only these mechanisms")
    args = parser.parse_args(argv)
    if args.names and args.command != "options":
        parser.error(f"mechanism names are only taken by 'options', not by {args.command!r}")
    if args.command == "options":
        from .info import format_options

        try:
            print(format_options(args.names))
        except KeyError as err:
            parser.error(str(err))
    elif args.command == "info":
        from .info import environment_report, format_report

        print(format_report(environment_report()))
    else:
        from . import capability_table

        print(capability_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
