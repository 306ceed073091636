"""Where points run: in this process, or in a worker process that may die.

The worker process (the default of the command line) protects the sweep from
what a mechanism can do to a process: a hard crash, a CPU out-of-memory kill
by the operating system, a point that runs far past its budget (the worker
is killed after ``timeout`` seconds and a fresh one is started), or a CUDA
error that leaves the context unusable (the worker exits after reporting it).  Points are
sent over a pipe as plain dicts; results come back the same way.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import signal
import warnings
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Mapping, Optional, Sequence, Tuple, Type

import torch

from ..base import EfficientAttention
from .measure import measure_point

logger = logging.getLogger(__name__)

__all__ = ["InProcessRunner", "SubprocessRunner", "import_modules", "context_is_broken"]


def import_modules(names: Sequence[str]) -> None:
    """Import modules that register extra mechanisms (``--import``)."""
    for name in names:
        importlib.import_module(name)


class InProcessRunner:
    """Runs points in this process; ``extra`` maps names to unregistered classes."""

    def __init__(self, extra: Optional[Mapping[str, Type[EfficientAttention]]] = None):
        self.extra = dict(extra or {})

    def run(self, point: Mapping) -> dict:
        return measure_point(point, self.extra)

    def close(self) -> None:
        pass


_FATAL_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure", "cuda error: misaligned")


def context_is_broken(result: Mapping) -> bool:
    """Whether a failed point left the CUDA context unusable (every later call in the process would fail)."""
    detail = str(result.get("detail", "")).lower()
    return result.get("status") == "error" and any(s in detail for s in _FATAL_CUDA)


def _worker_main(conn, imports: Sequence[str], threads: Optional[int], log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    # autograd's device thread in a fresh process sets its CUDA context itself; the warning is noise
    warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")
    if threads:
        torch.set_num_threads(threads)
    import_modules(imports)
    while True:
        try:
            point = conn.recv()
        except EOFError:
            return
        if point is None:
            return
        result = measure_point(point)
        if context_is_broken(result):  # let the parent start a fresh process for the next point
            result["restart_worker"] = True
            conn.send(result)
            return
        conn.send(result)


class SubprocessRunner:
    """Runs points in a spawned worker process, restarted after a crash or a timeout."""

    def __init__(self, imports: Sequence[str] = (), threads: Optional[int] = None, timeout: float = 600.0):
        self.imports, self.threads, self.timeout = tuple(imports), threads, float(timeout)
        self._ctx = mp.get_context("spawn")
        self._proc: Optional[BaseProcess] = None
        self._conn: Optional[Connection] = None

    def _start(self) -> Tuple[BaseProcess, Connection]:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.imports, self.threads, logging.getLogger().getEffectiveLevel()),
            name="efficient-attention-bench-worker",
            daemon=True,
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        return proc, parent

    def _stop(self, kill: bool) -> None:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        if kill:
            proc.kill()
        else:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
        self._proc = self._conn = None

    def run(self, point: Mapping) -> dict:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None or not proc.is_alive():
            self._stop(kill=True)
            proc, conn = self._start()
        timed_out = False
        try:
            conn.send(dict(point))
            if conn.poll(self.timeout):
                result = conn.recv()
                if result.pop("restart_worker", False):
                    logger.warning("the CUDA context is broken (%s); restarting the worker", result.get("detail"))
                    self._stop(kill=False)
                return result
            timed_out = True
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            pass  # the worker died
        if timed_out:  # no answer in time: kill it and say so
            logger.warning("point ran past the %.0f s timeout; restarting the worker", self.timeout)
            self._stop(kill=True)
            return {"status": "skipped", "reason": "budget", "detail": f"killed after the {self.timeout:.0f} s timeout"}
        proc.join(timeout=30)
        code = proc.exitcode
        self._stop(kill=True)
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            hint = " (the operating system's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
            detail = f"worker process killed by {sig}{hint}"
        else:
            detail = f"worker process exited with code {code}"
        logger.warning("%s; restarting the worker", detail)
        return {"status": "error", "reason": "crash", "detail": detail}

    def close(self) -> None:
        self._stop(kill=False)
