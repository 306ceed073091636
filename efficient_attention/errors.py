"""The library's exception types and error-message helpers, in one place.

Every error the library raises on purpose is a built-in type (``TypeError`` /
``ValueError`` naming the argument) or one of the classes below, which
subclass the built-in type that callers of the replaced libraries catch.  The
modules that used to define them re-export them, so the old import paths
(``efficient_attention.capabilities.UnsupportedInputError``, ...) keep working.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "UnsupportedPatternError",
    "UnsupportedInputError",
    "UnknownAttentionError",
    "UnknownSparsityModeError",
    "MechanismCheckError",
    "BackendUnavailableError",
    "did_you_mean",
]


class UnsupportedPatternError(AssertionError):
    """Raised when a mechanism is built for a pattern it does not support.

    It subclasses ``AssertionError`` because users of the reference library
    catch that.
    """


class UnsupportedInputError(ValueError):
    """Raised at forward time for an input the mechanism cannot honour."""


class UnknownAttentionError(KeyError):
    """No mechanism is registered under this name (a ``KeyError`` whose message reads as a sentence)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownSparsityModeError(ValueError, KeyError):
    """An unknown ``sparsity_mode`` (a ``ValueError``; also a ``KeyError``, as AttentionGrid raised)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MechanismCheckError(AssertionError):
    """A mechanism failed at least one generic check of :func:`efficient_attention.testing.check_mechanism`."""


class BackendUnavailableError(ValueError):
    """A kernel backend forced with ``backend=`` cannot take the inputs; the message lists every reason
    (:mod:`efficient_attention.kernels.dispatch`)."""


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``candidates`` (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(prefix + c) for c in close) + "?)"
