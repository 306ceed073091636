"""``python -m efficient_attention.benchmark``: see :mod:`efficient_attention.benchmark.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
