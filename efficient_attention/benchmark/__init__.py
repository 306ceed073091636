"""Benchmark suite: time, memory and efficiency length of every registered mechanism.

    python -m efficient_attention.benchmark --out bench-out        # or: efficient-attention-bench
    python -m efficient_attention.benchmark --help

Sweeps the registered mechanisms (plus two baselines: ``vanilla``, our
``MultiheadAttention`` on the SDPA path, and ``naive``, an unfused
softmax(QKᵀ)V) over patterns x lengths x {forward, forward+backward, decoding
step} x dtypes x devices, and writes ``results.json``, ``results.md`` and PNG
plots.  The method (timing, memory, budgets, efficiency length) is described
in :mod:`.measure`, :mod:`.sweep` and :mod:`.efficiency`, and in
``benchmarks/README.md``.  matplotlib is needed for the plots only.
"""

from .efficiency import Crossing, Fit, choose_degree, efficiency_lengths, fit_curve, fitted_crossing, measured_crossing
from .measure import MODES, cpu_peak_bytes, measure_point, parse_pattern
from .naive import NaiveAttention
from .report import efficiency_table, markdown_report, plot_results, write_outputs
from .sweep import DEFAULT_LENGTHS, SweepConfig, machine_info, run_sweep

__all__ = [
    "Crossing",
    "DEFAULT_LENGTHS",
    "Fit",
    "MODES",
    "NaiveAttention",
    "SweepConfig",
    "choose_degree",
    "cpu_peak_bytes",
    "efficiency_lengths",
    "efficiency_table",
    "fit_curve",
    "fitted_crossing",
    "machine_info",
    "markdown_report",
    "measure_point",
    "measured_crossing",
    "parse_pattern",
    "plot_results",
    "run_sweep",
    "write_outputs",
]
