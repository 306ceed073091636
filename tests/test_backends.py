"""The kernel backends as classes: one dispatcher per op, ``backend=`` on every entry, reasons, fallback logs."""

import logging

import pytest
import torch

from efficient_attention.kernels import (
    BackendUnavailableError,
    block_sparse_attention,
    dispatchers,
    landmark_attention,
    linear_attention,
    not_supported_reasons,
    sliding_window_attention,
)
from efficient_attention.kernels._loader import cpu_extension
from efficient_attention.kernels.backends import KINDS, Backend, ReferenceBackend, TritonBackend
from efficient_attention.kernels.dispatch import Dispatcher
from efficient_attention.local_window import LocalWindow

HAS_CPP = cpu_extension() is not None
WINDOW = LocalWindow.sliding(5, 2)


def _qkv(d=16, n=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _call(op, q, k, v, **kw):
    """Each op's public entry on (B, H, N, d) inputs; returns its output tensor."""
    if op == "sliding_window":
        return sliding_window_attention(q, k, v, WINDOW, **kw)[0]
    if op == "block_sparse":
        blocks = -(-q.shape[2] // 16)
        layout = torch.ones(2, blocks, blocks, dtype=torch.bool)
        return block_sparse_attention(q, k, v, layout, 16, causal=True, **kw)[0]
    if op == "linear_attention":
        return linear_attention(q.exp(), k.exp(), v, causal=True, **kw)
    return landmark_attention(q, k, v, 16, **kw)[0]


OPS = ("sliding_window", "block_sparse", "linear_attention", "landmark")


def test_every_op_has_a_dispatcher_of_backend_classes_ending_with_a_pytorch_path():
    table = dispatchers()
    assert tuple(table) == OPS
    for op, dispatcher in table.items():
        assert dispatcher.names[0] == "triton" and dispatcher.names[-1] == "reference"
        for cls in dispatcher.backends:
            assert issubclass(cls, Backend) and cls.op == op
            assert sum(issubclass(cls, kind) for kind in KINDS) == 1
        q, k, v = _qkv(n=40)
        assert dispatcher.backends[-1].not_supported_reasons(q, k, v) == []  # float64 CPU: the PyTorch path


@pytest.mark.parametrize("op", OPS)
def test_forcing_each_usable_backend_gives_the_same_result(op):
    q, k, v = _qkv()
    want = _call(op, q, k, v, backend="reference")
    want_grad = torch.autograd.grad(want.sum(), q)[0]
    names = [n for n, why in not_supported_reasons(op, q, k, v, **_params(op)).items() if not why]
    assert "reference" in names and (op not in ("sliding_window", "block_sparse") or not HAS_CPP or "cpp" in names)
    for name in names:
        got = _call(op, q, k, v, backend=name)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), q)[0], want_grad)


def _params(op):
    return {"block_sparse": dict(block_size=16), "landmark": dict(block_size=16)}.get(op, {})


@pytest.mark.parametrize("op", OPS)
def test_forced_backend_that_cannot_run_raises_with_every_reason(op):
    q, k, v = _qkv(d=8, n=8)  # float64, head dim 8, a short sequence: Triton objects several times on the CPU
    with pytest.raises(BackendUnavailableError) as info:
        _call(op, q, k, v, backend="triton")
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "backend='triton'" in msg
    reasons = not_supported_reasons(op, q, k, v, **_params(op))["triton"]
    assert len(reasons) >= 3 and all(r in msg for r in reasons)
    assert "not CUDA" in msg and "float64" in msg


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_name_is_a_value_error_naming_the_choices(op):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be None or one of .*'reference'"):
        _call(op, q, k, v, backend="cuda")
    with pytest.raises(TypeError, match="backend"):
        _call(op, q, k, v, backend=1)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ kernels are not built")
def test_forced_cpp_with_dropout_lists_the_reason():
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match="dropout_p=0.3"):
        sliding_window_attention(q, k, v, WINDOW, dropout_p=0.3, backend="cpp")


@pytest.mark.skipif(not HAS_CPP, reason="the C++ kernels are not built")
def test_automatic_fallback_is_logged_once_per_reason_set_at_warning(caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="efficient_attention.kernels.dispatch"):
        for p in (0.25, 0.25, 0.125):
            sliding_window_attention(q, k, v, WINDOW, dropout_p=p)
        sliding_window_attention(q, k, v, WINDOW)  # the C++ kernels: nothing to say
        linear_attention(q.exp(), k.exp(), v, causal=True)  # chunked on the CPU: Triton is no CPU fallback
    msgs = [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert len(msgs) == 2 and "dropout_p=0.25" in msgs[0] and "dropout_p=0.125" in msgs[1]
    assert "using the reference backend, not cpp" in msgs[0]


def test_a_dispatcher_takes_only_its_own_ops_backends():
    class Other(TritonBackend):
        op = "landmark"

    with pytest.raises(ValueError, match="computes 'landmark'"):
        Dispatcher("another_op", (Other,))


def test_a_dispatcher_whose_backends_all_refuse_lists_every_reason():
    class Picky(ReferenceBackend):
        op = "picky_test_op"

        @classmethod
        def input_reasons(cls, q, k, v):
            return ["it never runs"]

    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match="no backend can run picky_test_op.*reference: it never runs"):
        Dispatcher("picky_test_op", (Picky,)).select(None, q, k, v)


def test_landmark_keeps_the_old_name_of_its_pytorch_path():
    q, k, v = _qkv()
    torch.testing.assert_close(_call("landmark", q, k, v, backend="torch"), _call("landmark", q, k, v))


def test_triton_probe_runs_once_per_key_and_a_failure_is_logged_once_and_remembered(caplog):
    from efficient_attention.kernels import backends

    runs = []

    def broken():
        runs.append("broken")
        raise RuntimeError("no such intrinsic")

    key = ("test probe", object())
    with caplog.at_level(logging.WARNING, logger="efficient_attention.kernels.backends"):
        assert backends.triton_probe(key, broken, "Thing") is False
        assert backends.triton_probe(key, broken, "Thing") is False
    assert runs == ["broken"]
    warned = [r.getMessage() for r in caplog.records if "Thing" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError: no such intrinsic" in warned[0] and "PyTorch path" in warned[0]
    good = ("test probe ok", object())
    assert backends.triton_probe(good, lambda: runs.append("ok"), "Thing") is True
    assert backends.triton_probe(good, lambda: runs.append("ok"), "Thing") is True
    assert runs == ["broken", "ok"]
