"""Choosing the backend of a kernel call, and saying why the faster ones could not take it.

Each op has one :class:`Dispatcher` listing its backend classes (``backends.py``) fastest first.
:meth:`Dispatcher.select` returns

* the backend forced with ``backend="triton" | "cpp" | "chunked" | "reference"``, or raises
  :class:`~efficient_attention.kernels.backends.BackendUnavailableError` (a ``ValueError``) listing every
  reason it cannot take the inputs;
* else the first backend that supports the inputs.  Skipping a backend that runs on the inputs' device
  (the C++ kernels for CPU tensors, Triton for CUDA ones) is logged at WARNING, once per distinct set of
  reasons.

Decisions are cached by what the reasons depend on, so a repeated call costs a dict lookup.  The
function API :func:`not_supported_reasons` / :func:`choose_backend` answers the same per op name.
"""

from __future__ import annotations

import importlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from .backends import SHORT, Backend, BackendUnavailableError, cpu_threads, triton_reason

logger = logging.getLogger(__name__)

__all__ = [
    "Dispatcher",
    "dispatchers",
    "not_supported_reasons",
    "choose_backend",
    "triton_reason",
    "choose_landmark_backend",
    "landmark_not_supported_reasons",
]

# the modules that define each op's dispatcher (imported on first use, so this module imports none of them)
_OP_MODULES = {
    "sliding_window": ".ops",
    "block_sparse": ".ops",
    "linear_attention": ".linear_attention",
    "landmark": ".landmark",
}
OPS = tuple(_OP_MODULES)
_registry: Dict[str, "Dispatcher"] = {}
_logged: set = set()


class Dispatcher:
    """The backends of one op, fastest first; the last one must take every valid input."""

    def __init__(self, op: str, backends: Sequence[Type[Backend]], aliases: Optional[Dict[str, str]] = None):
        for b in backends:
            if b.op != op:
                raise ValueError(f"backend {b.__name__} computes {b.op!r}, not {op!r}")
        self.op = op
        self.backends = tuple(backends)
        self.aliases = dict(aliases or {})  # old backend names still accepted (e.g. landmark's "torch")
        self._decisions: dict = {}
        if op in _OP_MODULES:
            _registry[op] = self

    @property
    def names(self) -> tuple:
        return tuple(b.name for b in self.backends)

    def backend(self, name: str) -> Type[Backend]:
        """The backend class called ``name`` (``ValueError`` naming the choices otherwise)."""
        if not isinstance(name, str):
            raise TypeError(f"backend must be None or a str, got {type(name).__name__}")
        name = self.aliases.get(name, name)
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(f"backend must be None or one of {self.names} for {self.op}, got {name!r}")

    def not_supported_reasons(self, q: Tensor, k: Tensor, v: Tensor, **params) -> Dict[str, List[str]]:
        """Per backend name, every reason it cannot run these inputs ([] = it can)."""
        return {b.name: b.not_supported_reasons(q, k, v, **params) for b in self.backends}

    def select(self, backend: Optional[str], q: Tensor, k: Tensor, v: Tensor, **params) -> Type[Backend]:
        """The forced backend if it can run (else ``BackendUnavailableError`` with its reasons), or the first
        backend that supports the inputs (see the module doc for what is logged)."""
        compiling = torch.compiler.is_compiling()
        key = None
        if not compiling:
            key = (
                backend,
                q.device,
                k.device,
                v.device,
                q.dtype,
                k.dtype,
                v.dtype,
                q.dim(),
                k.dim(),
                v.dim(),
                q.shape[:2],  # batch and heads (the C++ linear kernel's threads: one per pair)
                cpu_threads() if q.device.type == "cpu" else 0,
                k.shape[1:2],
                v.shape[1:2],
                q.shape[-1:],
                v.shape[-1:],
                0 in q.shape or 0 in k.shape or 0 in v.shape,
                q.dim() > 2 and q.shape[2] < SHORT,
                tuple(sorted(params.items())),
            )
            hit = self._decisions.get(key)
            if hit is not None:
                return hit
        chosen = self._select(backend, q, k, v, compiling, params)
        if key is not None:
            self._decisions[key] = chosen
        return chosen

    def _select(self, backend, q, k, v, compiling, params) -> Type[Backend]:
        if backend is not None:
            cls = self.backend(backend)
            reasons = cls.not_supported_reasons(q, k, v, **params)
            if reasons:
                raise BackendUnavailableError(
                    f"backend={cls.name!r} cannot run {self.op} on these inputs: " + "; ".join(reasons)
                )
            return cls
        skipped: List[Tuple[Type[Backend], List[str]]] = []
        for cls in self.backends:
            reasons = cls.not_supported_reasons(q, k, v, **params)
            if not reasons:
                if not compiling:
                    self._log_fallback(cls, skipped, q.device.type)
                return cls
            skipped.append((cls, reasons))
        raise BackendUnavailableError(
            f"no backend can run {self.op} on these inputs: "
            + " | ".join(f"{c.name}: " + "; ".join(r) for c, r in skipped)
        )

    def _log_fallback(self, chosen: Type[Backend], skipped, device: str) -> None:
        for cls, reasons in skipped:
            if device not in cls.supported_devices():
                continue  # a backend of another device is no fallback (Triton for CPU tensors)
            msg = f"{self.op}: using the {chosen.name} backend, not {cls.name}, because " + "; ".join(reasons)
            if msg not in _logged:
                _logged.add(msg)
                logger.warning(msg)


def dispatchers() -> Dict[str, Dispatcher]:
    """Every op's dispatcher, by op name (imports the op modules)."""
    for op in OPS:
        _dispatcher(op)
    return {op: _registry[op] for op in OPS}


def _dispatcher(op: str) -> Dispatcher:
    if op not in _OP_MODULES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if op not in _registry:
        importlib.import_module(_OP_MODULES[op], __package__)
    return _registry[op]


def not_supported_reasons(op: str, q: Tensor, k: Tensor, v: Tensor, **params) -> Dict[str, List[str]]:
    """Per backend of ``op``, why it cannot run on these inputs ([] = it can), xformers-style.

    ``params``: ``dropout_p``, ``exclude_self``, ``positions`` (whether per-row ``q_pos`` are given; sliding
    window), ``dropout_p``, ``block_size`` (block sparse),
    ``block_size`` (landmark, k and v with q's head count)."""
    return _dispatcher(op).not_supported_reasons(q, k, v, **params)


def choose_backend(op: str, q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None, **params) -> str:
    """The name of the backend a call of ``op`` on these inputs runs on (see :meth:`Dispatcher.select`)."""
    return _dispatcher(op).select(backend, q, k, v, **params).name


def landmark_not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, *, block_size: int) -> Dict[str, List[str]]:
    """:func:`not_supported_reasons` of ``"landmark"`` (k, v already with q's head count)."""
    return not_supported_reasons("landmark", q, k, v, block_size=block_size)


def choose_landmark_backend(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> str:
    """:func:`choose_backend` of ``"landmark"``."""
    return choose_backend("landmark", q, k, v, block_size=block_size)
