"""What this installation can do: versions, kernel backends, mechanisms (``python -m efficient_attention info``).

:func:`environment_report` collects the facts as plain data and :func:`format_report` turns them
into text, so a program can read the same answers the command prints:

* versions of the library, torch, Triton, fairseq and ParaGen (``None`` when not installed);
* per kernel backend (the backend classes of :mod:`efficient_attention.kernels`: Triton GPU kernels,
  C++ CPU kernels, chunked and reference PyTorch paths) the ops it computes, whether it is usable in
  this process and, if not, why;
* per registered mechanism its patterns, incremental decoding, attention weights, and which of
  its fast compute paths can run here.

Nothing here imports fairseq or ParaGen (versions come from the installed distributions).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

__all__ = [
    "BackendStatus",
    "MechanismSummary",
    "EnvironmentReport",
    "environment_report",
    "format_report",
    "format_options",
]

# distribution names to try for each component, first found wins
_DISTRIBUTIONS = {
    "efficient-attention": ("efficient-attention",),
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "fairseq": ("fairseq-fixed", "fairseq"),
    "paragen": ("paragen",),
}


@dataclass(frozen=True)
class BackendStatus:
    """One kernel backend (the ``backend=`` name): ``usable`` in this process, else ``reason`` says why not."""

    name: str
    device: str  # the device types it runs on, "any" for the PyTorch paths
    usable: bool
    reason: Optional[str]
    description: str = ""
    ops: Tuple[str, ...] = ()


@dataclass(frozen=True)
class MechanismSummary:
    """One registered mechanism as this installation runs it."""

    name: str
    class_name: str
    patterns: Tuple[str, ...]
    decoding: str
    weights: bool
    backends: Tuple[str, ...]  # as declared by the mechanism (its Capabilities)
    fast_here: Tuple[str, ...]  # the fast paths among them that can run here ("" = PyTorch only)


@dataclass(frozen=True)
class EnvironmentReport:
    versions: Dict[str, Optional[str]]
    python: str
    location: str  # the directory the library is imported from
    cuda: Optional[str]  # "device name (CUDA x.y)" or None
    backends: Tuple[BackendStatus, ...]
    mechanisms: Tuple[MechanismSummary, ...]


def _version(component: str) -> Optional[str]:
    if component == "efficient-attention":
        from . import __version__

        return __version__
    for dist in _DISTRIBUTIONS[component]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if importlib.util.find_spec(component) is not None:  # importable without distribution metadata
        return "installed (version unknown)"
    return None


def _cuda() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"


def _backends() -> Tuple[BackendStatus, ...]:
    """One row per backend name, from the backend classes of every op's dispatcher (fastest first)."""
    from .kernels.backends import KINDS
    from .kernels.dispatch import dispatchers

    classes: Dict[str, list] = {}
    for dispatcher in dispatchers().values():
        for cls in dispatcher.backends:
            classes.setdefault(cls.name, []).append(cls)
    rows = []
    for name, group in sorted(classes.items(), key=lambda kv: _ORDER.index(kv[0]) if kv[0] in _ORDER else 99):
        reasons = [(c.op, c.environment_reason()) for c in group]
        why = "; ".join(dict.fromkeys(r for _, r in reasons if r)) or None
        base = next(kind for kind in KINDS if issubclass(group[0], kind))  # TritonBackend, CppBackend, ...
        rows.append(
            BackendStatus(
                name,
                "/".join(base.devices) or "any",
                why is None,
                why,
                base.description,
                tuple(op for op, _ in reasons),
            )
        )
    return tuple(rows)


_ORDER = ("triton", "cpp", "chunked", "reference")


def _fast_here(declared: Tuple[str, ...], backends: Tuple[BackendStatus, ...]) -> Tuple[str, ...]:
    """The compute paths among ``declared`` that run here, beyond plain PyTorch."""
    by_name = {b.name: b for b in backends}
    cpp, triton = by_name["cpp"], by_name["triton"]
    here: List[str] = []
    for b in declared:
        if b == "sdpa":
            here.append("sdpa (torch's fused attention)")
        elif b.startswith("kernels"):
            if cpp.usable:
                here.append("C++ CPU kernels")
            if triton.usable:
                here.append("Triton GPU kernels")
        elif b == "triton" and triton.usable:  # a mechanism's own Triton kernels (landmark, S4D, ABC's slots)
            here.append("Triton GPU kernels")
    return tuple(dict.fromkeys(here))


def _mechanisms(backends: Tuple[BackendStatus, ...]) -> Tuple[MechanismSummary, ...]:
    from .registry import available_attentions

    rows = []
    for name, info in available_attentions().items():
        caps = info.capabilities
        decoding = ("yes, constant state" if caps.constant_state else "yes") if caps.incremental else "no"
        rows.append(
            MechanismSummary(
                name,
                info.cls.__name__,
                caps.pattern_names(),
                decoding,
                caps.need_weights,
                tuple(caps.backends),
                _fast_here(tuple(caps.backends), backends),
            )
        )
    return tuple(rows)


def environment_report() -> EnvironmentReport:
    """Collect versions, kernel backends and mechanisms for this process."""
    backends = _backends()
    return EnvironmentReport(
        versions={c: _version(c) for c in _DISTRIBUTIONS},
        python=platform.python_version(),
        location=str(Path(__file__).resolve().parent),
        cuda=_cuda(),
        backends=backends,
        mechanisms=_mechanisms(backends),
    )


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def format_options(names: Optional[List[str]] = None) -> str:
    """Every option of the registered mechanisms (or of ``names``), as ``python -m efficient_attention options``
    prints them: name, type, default, the rule its values follow and the help, read from each option spec."""
    from .registry import available_attentions, get_attention_class

    infos = available_attentions()
    chosen: List[str] = list(infos)
    if names:
        chosen = []
        for n in names:
            name = get_attention_class(n).attention_name
            assert name is not None  # set by @register_attention on every class the registry returns
            chosen.append(name)
    lines: List[str] = []
    for name in dict.fromkeys(chosen):
        info = infos[name]
        lines.append(f"{name} ({info.cls.__name__}):" + ("" if info.options else " no options of its own"))
        rows = [(o.name, _type_name(o.type), repr(o.default), o.describe(), o.help) for o in info.options.values()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else []
        for r in rows:
            lines.append("  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[4])
    return "\n".join(lines)


_SHORT = {
    "noncausal self": "self",
    "causal self": "causal-self",
    "noncausal cross": "cross",
    "causal cross": "causal-cross",
}


def format_report(report: EnvironmentReport) -> str:
    """The report as the text ``python -m efficient_attention info`` prints."""
    lines = ["efficient-attention environment", "", "versions:"]
    width = max(len(c) for c in report.versions)
    for comp, ver in report.versions.items():
        lines.append(f"  {comp:<{width}}  {ver or 'not installed'}")
    lines.append(f"  {'python':<{width}}  {report.python}")
    lines.append(f"  {'location':<{width}}  {report.location}")
    lines.append(f"  {'GPU':<{width}}  {report.cuda or 'none (CUDA not available)'}")
    lines += ["", "kernel backends (backend= name, devices, ops; forced with backend=...):"]
    for b in report.backends:
        state = "usable" if b.usable else f"not usable: {b.reason}"
        lines.append(f"  {b.name:<10} {b.device:<5} {b.description}")
        lines.append(f"  {'':<10} {'':<5} ops: {', '.join(b.ops)}; {state}")
    lines += ["", "mechanisms:"]
    rows = [("name", "patterns", "decoding", "weights", "fast paths here")]
    for m in report.mechanisms:
        rows.append(
            (
                m.name,
                ",".join(_SHORT.get(p, p) for p in m.patterns),
                m.decoding,
                "yes" if m.weights else "no",
                ", ".join(m.fast_here) or "PyTorch only",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[4])
    return "\n".join(lines)
