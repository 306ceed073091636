"""Host overhead (issue 13 item 5): ``torch.compile(fullgraph=True)`` of every registered mechanism and pattern,
and a forward + backward whose number of launched ops does not grow with the sequence length.

Compilation uses Dynamo with the ``eager`` backend: it proves the forward is one graph (no graph break) and
that the graph computes the eager output, at a CI cost of about a second per case (``aot_eager``/inductor
would add minutes on two cores).  ``capture_scalar_outputs`` lets a data-dependent count (ProbSparse's number
of active rows) stay inside the graph.  One pattern per mechanism runs by default, the others are ``slow``.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import EMBED_DIM, assert_close, build, case_id, inputs, mechanism_patterns


def _compile_cases():
    seen, cases = set(), []
    for name, pattern in mechanism_patterns():
        marks = [pytest.mark.slow] if name in seen else []
        seen.add(name)
        cases.append(pytest.param(name, pattern, marks=marks, id=f"{name}-{case_id(pattern)}"))
    return cases


@pytest.mark.parametrize("name,pattern", _compile_cases())
def test_compiles_in_one_graph(name, pattern):
    torch._dynamo.reset()
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    expected, _ = m(q, k, v, need_weights=False)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, _ = torch.compile(m, fullgraph=True, backend="eager")(q, k, v, need_weights=False)
    assert_close(out, expected, torch.float32, msg=f"{name} {pattern}: compiled != eager")


class _CountOps(TorchDispatchMode):
    """Counts the ATen ops (each one or more kernel launches) run inside the mode, backward included."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


OWN = [(n, p) for n, p in mechanism_patterns() if n in ("s4d", "probsparse", "nystrom", "lara")]


@pytest.mark.parametrize("name,pattern", OWN, ids=case_id)
def test_launches_do_not_grow_with_length(name, pattern):
    m = build(name, pattern, dtype=torch.float32).train()  # the training path (ProbSparse samples randomly)
    m(torch.randn(8, 2, EMBED_DIM), need_weights=False)[0].sum().backward()  # first gradients are set up (ops)
    counts = []
    for length in (1000, 5000):
        x = torch.randn(length, 2, EMBED_DIM, requires_grad=True)
        with _CountOps() as ops:
            out, _ = m(x, need_weights=False)
            out.sum().backward()
        counts.append(ops.count)
    assert counts[0] == counts[1], f"{name} {pattern}: {counts[0]} ops at L=1000, {counts[1]} at L=5000"
