"""efficient_attention.testing.check_mechanism: passes for the registry, catches broken mechanisms."""

from __future__ import annotations

import pytest
from references import get_reference

from efficient_attention import (
    AttentionMasks,
    Capabilities,
    EfficientAttention,
    Pattern,
    available_attentions,
    register_attention,
    registry,
)
from efficient_attention.capabilities import SELF_PATTERNS
from efficient_attention.functional import dense_attention, repeat_kv
from efficient_attention.testing import MechanismCheckError, check_mechanism


@pytest.mark.parametrize("name", sorted(available_attentions()))
def test_every_registered_mechanism_passes(name):
    ref = get_reference(name)
    report = check_mechanism(name, options=ref.options, reference=ref.fn, tgt_len=ref.tgt_len, src_len=ref.src_len)
    report.raise_if_failed()
    ran = [r for r in report.results if r.status == "passed"]
    caps = available_attentions()[name].capabilities
    assert {r.pattern for r in ran} == set(caps.patterns)
    assert any(r.check == "reference" for r in ran)
    if any(p.causal for p in caps.patterns):
        assert any(r.check == "causality" for r in ran)
    assert "FAILED" not in str(report) and report.passed and bool(report)


def _dense(self, q, k, v, masks: AttentionMasks, causal: bool):
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    kpm = None if masks.key_padding is None else masks.key_padding[:, None, None, :]
    out, _ = dense_attention(q, k, v, kpm, causal=causal, scale=self.scaling)
    return out, None


class _Leaky(EfficientAttention):
    """Declares causal self attention but never applies the causal mask (the base does not do it for you)."""

    capabilities = Capabilities(patterns=SELF_PATTERNS)

    def _attend(self, q, k, v, masks, need_weights):
        return _dense(self, q, k, v, masks, causal=False)


class _IgnoresPadding(EfficientAttention):
    capabilities = Capabilities(patterns=frozenset({Pattern.NONCAUSAL_SELF}))

    def _attend(self, q, k, v, masks, need_weights):
        return _dense(self, q, k, v, AttentionMasks(), causal=False)


@pytest.fixture
def registered_from_outside():
    """Register a class under a test name, and take it out of the registry afterwards."""
    names = []

    def register(name, cls):
        register_attention(name)(cls)
        names.append(name)
        return cls

    yield register
    for name in names:
        registry._REGISTRY.pop(name, None)


def test_catches_a_mechanism_that_ignores_causality(registered_from_outside):
    registered_from_outside("test_leaky_causal", _Leaky)
    report = check_mechanism("test_leaky_causal")
    assert not report.passed
    failed = {(r.check, r.pattern) for r in report.failures}
    assert ("causality", Pattern.CAUSAL_SELF) in failed
    assert all(r.pattern is Pattern.CAUSAL_SELF for r in report.failures)  # its noncausal pattern is fine
    text = str(report)
    assert "FAIL causality (causal self)" in text and "depends on the future" in text
    with pytest.raises(MechanismCheckError, match=r"(?s)test_leaky_causal failed .*causality"):
        report.raise_if_failed()


def test_catches_a_mechanism_that_ignores_padding():
    report = check_mechanism(_IgnoresPadding)  # an unregistered class works too
    assert [(r.check, r.status) for r in report.failures] == [("padding invariance", "failed")]
    assert "_IgnoresPadding" in str(report)


def test_a_crash_is_reported_in_words():
    class Crashes(EfficientAttention):
        capabilities = Capabilities(patterns=frozenset({Pattern.NONCAUSAL_SELF}))

        def _attend(self, q, k, v, masks, need_weights):
            raise RuntimeError("boom")

    report = check_mechanism(Crashes)
    assert report.failures and all("RuntimeError: boom" in r.detail for r in report.failures)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="EfficientAttention subclass"):
        check_mechanism(object)
    with pytest.raises(KeyError, match="did you mean 'vanilla'"):
        check_mechanism("vanila")
    with pytest.raises(ValueError, match="does not declare causal self"):
        check_mechanism("nystrom", patterns=[Pattern.CAUSAL_SELF])
