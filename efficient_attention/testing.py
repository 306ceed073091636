"""Check your own mechanism: the generic properties every registered mechanism must have.

    from efficient_attention.testing import check_mechanism

    report = check_mechanism(MyAttention, options=dict(window=4))   # or a registered name
    print(report)               # one line per check and pattern, in words
    report.raise_if_failed()    # MechanismCheckError (an AssertionError) listing what failed

For every pattern the mechanism declares (``capabilities.patterns``), on small float64 inputs:

* **reference** (only with ``reference=``): the output matches your float64 reference, with and
  without key padding;
* **causality** (causal patterns): changing future queries, keys and values leaves earlier outputs
  unchanged, and no gradient from earlier outputs reaches future positions;
* **padding invariance**: what padded keys hold does not change the output of real positions;
* **incremental = full** (``capabilities.incremental``): token-by-token decoding with
  ``incremental_state`` (causal patterns) or cached ``static_kv`` keys (noncausal cross) gives the
  full forward's output;
* **gradients**: every parameter gets a finite gradient.

This is what ``tests/test_generic.py`` runs over the registry (it also checks fp16/bf16, beam
reordering, state dicts and more).  Nothing here prints; ``str(report)`` is the text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
from torch import Tensor

from .base import EfficientAttention
from .capabilities import Pattern
from .errors import MechanismCheckError
from .registry import get_attention_class

__all__ = ["check_mechanism", "CheckResult", "MechanismReport", "MechanismCheckError"]

# ref(module, query, key, value, *, key_padding_mask=None) -> (T, B, C) float64
Reference = Callable[..., Tensor]


@dataclass(frozen=True)
class CheckResult:
    """One check in one pattern: ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"``."""

    check: str
    pattern: Pattern
    status: str
    detail: str = ""

    def __str__(self) -> str:
        mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[self.status]
        return f"{mark} {self.check} ({self.pattern})" + (f": {self.detail}" if self.detail else "")


@dataclass
class MechanismReport:
    """The results of :func:`check_mechanism`; ``str(report)`` reads them out."""

    mechanism: str
    results: List[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> List[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        ran = [r for r in self.results if r.status != "skipped"]
        head = f"{self.mechanism}: {len(ran) - len(self.failures)} of {len(ran)} checks passed" + (
            "" if self.passed else f", {len(self.failures)} FAILED"
        )
        return "\n".join([head, *("  " + str(r) for r in self.results)])

    def raise_if_failed(self) -> "MechanismReport":
        """Raise :class:`MechanismCheckError` with the failed checks, else return the report."""
        if self.failures:
            raise MechanismCheckError(
                f"{self.mechanism} failed {len(self.failures)} generic check(s):\n"
                + "\n".join("  " + str(r) for r in self.failures)
            )
        return self


class _CheckFailed(Exception):
    pass


def _close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str) -> None:
    if actual.shape != expected.shape:
        raise _CheckFailed(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise _CheckFailed(f"{what}: the output holds NaN or inf")
    err = (actual.double() - expected.double()).abs()
    bad = err > atol + rtol * expected.double().abs()
    if bad.any():
        raise _CheckFailed(
            f"{what}: max abs difference {err.max().item():.3g} (atol {atol:g}, rtol {rtol:g}) "
            f"at {int(bad.sum())} of {bad.numel()} elements"
        )


class _Checker:
    """The inputs and the checks for one mechanism class in one pattern (float64, eval mode)."""

    def __init__(
        self,
        cls,
        pattern: Pattern,
        options: Dict,
        *,
        embed_dim: int,
        num_heads: int,
        tgt_len: int,
        src_len: int,
        batch_size: int,
        seed: int,
        atol: float,
        rtol: float,
    ):
        self.cls, self.pattern, self.options = cls, pattern, options
        self.embed_dim, self.num_heads, self.seed = embed_dim, num_heads, seed
        self.atol, self.rtol = atol, rtol
        torch.manual_seed(seed)
        self.module = self.build()
        src = src_len if pattern is Pattern.NONCAUSAL_CROSS else tgt_len
        g = torch.Generator().manual_seed(seed + 1)
        self.q = torch.randn(tgt_len, batch_size, embed_dim, generator=g, dtype=torch.float64)
        if pattern.cross:
            self.k = torch.randn(src, batch_size, embed_dim, generator=g, dtype=torch.float64)
            self.v = torch.randn(src, batch_size, embed_dim, generator=g, dtype=torch.float64)
        else:
            self.k = self.v = self.q
        # padding: batch 1 loses 3 keys, the last batch 1 key (at the end when causal, else at the start)
        self.kpm = torch.zeros(batch_size, src, dtype=torch.bool)
        if batch_size > 1 and src > 3:
            if pattern.causal:
                self.kpm[1, src - 3 :] = True
                self.kpm[batch_size - 1, src - 1 :] = True
            else:
                self.kpm[1, :3] = True
                self.kpm[batch_size - 1, :1] = True

    def build(self) -> EfficientAttention:
        torch.manual_seed(self.seed)
        m = self.cls(
            self.embed_dim, self.num_heads, cross=self.pattern.cross, causal=self.pattern.causal, **self.options
        )
        return m.to(torch.float64).eval()

    def forward(self, q, k, v, **kw) -> Tensor:
        out, _ = self.module(q, k, v, need_weights=False, **kw)
        return out

    def real_rows(self, out: Tensor) -> Tensor:
        """``out`` with the rows of padded query positions zeroed (self patterns: queries are the keys)."""
        if self.pattern.cross:
            return out
        return out.masked_fill(self.kpm.t().unsqueeze(-1), 0.0)

    # ------------------------------------------------------------ checks
    def reference(self, ref: Reference) -> str:
        out = self.forward(self.q, self.k, self.v)
        _close(out, ref(self.module, self.q, self.k, self.v), self.atol, self.rtol, "without padding")
        out = self.forward(self.q, self.k, self.v, key_padding_mask=self.kpm)
        expected = ref(self.module, self.q, self.k, self.v, key_padding_mask=self.kpm)
        _close(self.real_rows(out), self.real_rows(expected), self.atol, self.rtol, "with key padding")
        return ""

    def causality(self) -> str:
        q, k, v = (x.clone().requires_grad_(True) for x in (self.q, self.k, self.v))
        if not self.pattern.cross:
            k = v = q
        cut = q.shape[0] // 2
        out = self.forward(q, k, v)
        with torch.no_grad():
            q2, k2, v2 = q.detach().clone(), k.detach().clone(), v.detach().clone()
            q2[cut + 1 :] += 3.0
            k2[cut + 1 :] -= 2.0
            v2[cut + 1 :] *= -1.5
            if not self.pattern.cross:
                k2 = v2 = q2
            out2 = self.forward(q2, k2, v2)
        diff = (out[: cut + 1].detach() - out2[: cut + 1]).abs().max().item()
        if diff > self.atol:
            raise _CheckFailed(
                f"changing positions after {cut} changed the outputs at positions 0..{cut} "
                f"(by up to {diff:.3g}): the output depends on the future"
            )
        out[: cut + 1].sum().backward()
        for name, x in (("query", q), ("key", k), ("value", v)):
            if x.grad is not None and (x.grad[cut + 1 :] != 0).any():
                raise _CheckFailed(f"a gradient from positions 0..{cut} reaches future {name} positions")
        return f"positions 0..{cut} do not see {cut + 1}..{q.shape[0] - 1}"

    def padding(self) -> str:
        if not self.kpm.any():
            raise _CheckFailed("needs batch_size > 1 and more than 3 keys to pad")
        out = self.forward(self.q, self.k, self.v, key_padding_mask=self.kpm)
        noise = (
            torch.randn(self.k.shape, generator=torch.Generator().manual_seed(self.seed + 2), dtype=torch.float64) * 5
        )
        keep = ~self.kpm.t().unsqueeze(-1)
        k2, v2 = torch.where(keep, self.k, noise), torch.where(keep, self.v, -noise)
        q2 = self.q if self.pattern.cross else k2
        if not self.pattern.cross:
            v2 = k2
        out2 = self.forward(q2, k2, v2, key_padding_mask=self.kpm)
        _close(
            self.real_rows(out2),
            self.real_rows(out),
            self.atol,
            self.rtol,
            "changing the contents of padded keys changed real outputs",
        )
        return ""

    def incremental(self) -> str:
        full = self.forward(self.q, self.k, self.v)
        state: Dict = {}
        steps = []
        static = self.pattern is Pattern.NONCAUSAL_CROSS
        for t in range(self.q.shape[0]):
            if static:  # the keys are given once, then come from the cache
                k, v = (self.k, self.v) if t == 0 else (None, None)
                steps.append(self.forward(self.q[t : t + 1], k, v, incremental_state=state, static_kv=True))
            else:
                sl = slice(t, t + 1)
                steps.append(self.forward(self.q[sl], self.k[sl], self.v[sl], incremental_state=state))
        _close(
            torch.cat(steps),
            full,
            self.atol,
            self.rtol,
            "decoding token by token" + (" with static_kv" if static else "") + " differs from the full forward",
        )
        return "static_kv cache" if static else "token by token"

    def gradients(self) -> str:
        m = self.build().train()
        out, _ = m(self.q, self.k, self.v, need_weights=False)
        (out**2).sum().backward()
        params = list(m.named_parameters())
        missing = [n for n, p in params if p.requires_grad and p.grad is None]
        bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
        if missing:
            raise _CheckFailed(f"no gradient reaches {', '.join(missing)}")
        if bad:
            raise _CheckFailed(f"non-finite gradient in {', '.join(bad)}")
        return f"{len(params)} parameters"


def _resolve(mechanism) -> Tuple[Type[EfficientAttention], str]:
    if isinstance(mechanism, str):
        cls = get_attention_class(mechanism)
        return cls, cls.attention_name or mechanism
    if isinstance(mechanism, type) and issubclass(mechanism, EfficientAttention):
        return mechanism, mechanism.attention_name or mechanism.__name__
    raise TypeError(f"mechanism must be a registered name or an EfficientAttention subclass, got {mechanism!r}")


def check_mechanism(
    mechanism: Union[str, Type[EfficientAttention]],
    *,
    options: Optional[Dict] = None,
    reference: Optional[Reference] = None,
    patterns: Optional[Iterable[Pattern]] = None,
    embed_dim: int = 16,
    num_heads: int = 4,
    tgt_len: int = 11,
    src_len: int = 14,
    batch_size: int = 3,
    seed: int = 0,
    atol: float = 1e-7,
    rtol: float = 1e-6,
) -> MechanismReport:
    """Run the generic checks on a mechanism in every pattern it supports (float64, CPU).

    Args:
        mechanism: an :class:`EfficientAttention` subclass (registered or not) or a registered name.
        options: its own constructor options (e.g. a window size that fits ``tgt_len``).
        reference: optional ``ref(module, query, key, value, *, key_padding_mask=None)`` returning
            the expected ``(T, B, C)`` float64 output (after ``out_proj``) from the module's parameters;
            ``key`` / ``value`` are the query for self patterns.
        patterns: the patterns to check (default: every pattern the mechanism declares).
        embed_dim, num_heads, tgt_len, src_len, batch_size: the test inputs' sizes (``src_len``: keys
            of noncausal cross attention; the other patterns use ``tgt_len`` keys).
        seed: parameters and inputs are drawn from it.
        atol, rtol: float64 tolerances of every comparison.

    Returns:
        a :class:`MechanismReport`; it never raises for a failed check (``report.raise_if_failed()``
        does), only for arguments that are wrong (``TypeError`` / ``ValueError``).
    """
    cls, name = _resolve(mechanism)
    options = dict(options or {})
    declared = [p for p in Pattern if cls.capabilities.supports(p)]
    chosen = declared if patterns is None else list(patterns)
    for p in chosen:
        if not isinstance(p, Pattern):
            raise TypeError(f"patterns must hold Pattern values, got {p!r}")
        if p not in declared:
            raise ValueError(f"{name} does not declare {p}; it declares: {', '.join(map(str, declared))}")
    if batch_size < 1 or tgt_len < 2 or src_len < 1:
        raise ValueError(f"need batch_size >= 1, tgt_len >= 2, src_len >= 1; got {batch_size}, {tgt_len}, {src_len}")
    report = MechanismReport(name)
    for pattern in chosen:
        try:
            checker = _Checker(
                cls,
                pattern,
                options,
                embed_dim=embed_dim,
                num_heads=num_heads,
                tgt_len=tgt_len,
                src_len=src_len,
                batch_size=batch_size,
                seed=seed,
                atol=atol,
                rtol=rtol,
            )
        except Exception as exc:  # the mechanism's own error, reported in words
            report.results.append(CheckResult("build", pattern, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        caps = cls.capabilities
        plan: List[Tuple[str, Optional[Callable[[], str]], str]] = [
            ("reference", functools.partial(checker.reference, reference) if reference else None, "no reference given"),
            ("causality", checker.causality if pattern.causal else None, "noncausal pattern"),
            (
                "padding invariance",
                checker.padding if caps.key_padding_mask else None,
                "the mechanism does not take key_padding_mask",
            ),
            (
                "incremental = full",
                checker.incremental if caps.incremental and (pattern.causal or pattern.cross) else None,
                "noncausal self attention is not decoded"
                if caps.incremental
                else "the mechanism does not declare incremental decoding",
            ),
            ("gradients", checker.gradients, ""),
        ]
        for check, run, why_skipped in plan:
            if run is None:
                report.results.append(CheckResult(check, pattern, "skipped", why_skipped))
                continue
            try:
                detail = run()
            except _CheckFailed as exc:
                report.results.append(CheckResult(check, pattern, "failed", str(exc)))
            except Exception as exc:  # a crash inside the mechanism is a failed check, said in words
                report.results.append(CheckResult(check, pattern, "failed", f"raised {type(exc).__name__}: {exc}"))
            else:
                report.results.append(CheckResult(check, pattern, "passed", detail))
    return report
