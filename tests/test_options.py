"""The option spec (``efficient_attention.options``): one generic test over the registry replaces the
per-mechanism bad-option tests; every bad value is derived from the option's declared rule."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from helpers import EMBED_DIM, NUM_HEADS
from references import get_reference

import efficient_attention as ea
from efficient_attention import EfficientAttention, Pattern, available_attentions, build_attention
from efficient_attention.options import (
    AttentionOptions,
    Option,
    choice,
    nonnegative_int,
    option,
    option_specs,
    positive_int,
)

INFOS = available_attentions()
NAMES = sorted(INFOS)


def _bad_values(opt: Option):
    """Values that break ``opt``'s declared rule, each with the error it must raise."""
    tp, elem = opt.base_type, opt.element_type
    if tp is bool:
        return [("false", TypeError), (2, TypeError), (0.5, TypeError)] + ([] if opt.optional else [(None, TypeError)])
    bad = [] if opt.optional else [(None, ValueError)]
    if opt.choices is not None:
        return bad + [("no_such_choice", ValueError), (3, ValueError)]
    if elem is int:
        bad += [("a,b", ValueError), (2.5, ValueError), ((1, "x"), ValueError)]
        return bad + ([((int(opt.minimum) - 1,), ValueError)] if opt.minimum is not None else [])
    if tp is int:
        bad += [(2.5, ValueError), (True, ValueError), ("3", ValueError)]
        if opt.minimum is not None:
            bad.append((int(opt.minimum) - 1, ValueError))
        if opt.maximum is not None:
            bad.append((int(opt.maximum) + 1, ValueError))
        if opt.odd:
            low = 2 if opt.minimum is None else int(opt.minimum) + int(opt.minimum) % 2
            bad.append((low, ValueError))
        return bad
    if tp is float:
        return bad + [("x", ValueError), (True, ValueError)]
    return bad + [(object(), ValueError)]


def _cases():
    for name in NAMES:
        for opt in INFOS[name].options.values():
            for value, exc in _bad_values(opt):
                yield pytest.param(name, opt.name, value, exc, id=f"{name}-{opt.name}-{value!r}")


def _build(name, **options):
    caps = INFOS[name].capabilities
    pattern = next(p for p in Pattern if caps.supports(p))
    kw = dict(get_reference(name).options)
    kw.update(options)
    return build_attention(
        name, embed_dim=EMBED_DIM, num_heads=NUM_HEADS, cross=pattern.cross, causal=pattern.causal, **kw
    )


@pytest.mark.parametrize("name,option_name,value,exc", list(_cases()))
def test_every_option_rejects_values_outside_its_rule(name, option_name, value, exc):
    """Wrong type or out of bounds: a ValueError (a TypeError for bool options) naming the argument and value."""
    with pytest.raises(exc) as err:
        _build(name, **{option_name: value})
    assert option_name in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_every_option_default_is_accepted_and_set(name):
    specs = INFOS[name].options
    module = _build(name)
    for opt in specs.values():
        opt.validate(opt.default)  # the declaration is consistent
        assert hasattr(module, opt.name), f"{name} does not keep option {opt.name} as an attribute"
    declared = option_specs(INFOS[name].cls.Options)
    assert set(declared) <= set(specs)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_suggests_the_closest(name):
    opts = [o for o in INFOS[name].options if o != "num_kv_heads"]
    if not opts:
        pytest.skip("no options of its own")
    typo = opts[0][:-1] + "x"
    with pytest.raises(TypeError, match=rf"unexpected option '{typo}' \(did you mean '{opts[0]}'"):
        _build(name, **{typo: 1})


def test_constructor_keywords_are_unchanged():
    m = ea.Performer(512, 8, approx_attn_dim=64)
    assert m.approx_attn_dim == 64 and m.projection_matrix.shape == (64, 64)
    assert ea.BigBirdAttention(16, 2).layout == "bigbird"
    assert ea.LocalAttention(16, 2, window_size=4).wsize == 4
    assert ea.DilatedAttention(16, 4, segment_lengths=[8, 16], dilation_rates="1,2").segment_lengths == (8, 16)


def test_options_dataclass_checks_without_a_module():
    opts = ea.Performer.Options(approx_attn_dim=32)
    assert opts.approx_attn_dim == 32 and opts.orthogonal_features is True
    with pytest.raises(ValueError, match="approx_attn_dim must be a positive integer, got 0"):
        ea.Performer.Options(approx_attn_dim=0)


# ----------------------------------------------------------------- Option
def test_describe_and_convert():
    pos = Option("n", 1, int, "h", minimum=1)
    assert pos.describe() == "a positive integer" and pos.convert("7") == 7
    opt = Option("m", None, Optional[int], "h", minimum=0)
    assert opt.describe() == "a non-negative integer or None" and opt.convert("none") is None
    seq = Option("s", (1,), Tuple[int, ...], "h", minimum=1)
    assert seq.convert("(8, 16)") == (8, 16) and seq.validate([8, 16]) == (8, 16) and seq.validate(4) == (4,)
    flag = Option("f", True, bool, "h")
    assert flag.convert("off") is False and flag.convert("yes") is True
    with pytest.raises(ValueError):
        flag.convert("maybe")
    ch = Option("c", "a", str, "h", choices=("a", "b"))
    assert ch.describe() == "one of 'a', 'b'" and ch.convert("b") == "b"
    with pytest.raises(ValueError, match="expected one of"):
        ch.convert("z")
    odd = Option("k", None, Optional[int], "h", minimum=1, odd=True)
    assert odd.describe() == "a positive odd integer or None"
    with pytest.raises(ValueError, match="k must be a positive odd integer or None, got 4"):
        odd.validate(4)
    prob = Option("p", 0.0, float, "h", minimum=0.0, maximum=1.0)
    assert prob.validate(1) == 1.0 and prob.describe() == "a number >= 0.0 and <= 1.0"
    with pytest.raises(ValueError, match="p must be a number >= 0.0 and <= 1.0, got 1.5"):
        prob.validate(1.5)


def test_declaration_errors():
    @dataclass(frozen=True)
    class NoHelp(AttentionOptions):
        width: int = 3

    with pytest.raises(TypeError, match="NoHelp.width must be declared with option"):
        option_specs(NoHelp)

    @dataclass(frozen=True)
    class BadDefault(AttentionOptions):
        width: int = positive_int(0, "a width")

    with pytest.raises(TypeError, match="BadDefault.width: the default breaks the option's rule"):
        option_specs(BadDefault)
    with pytest.raises(TypeError, match="help text"):
        option(1, "")


def test_a_new_mechanism_declares_its_options_once():
    @dataclass(frozen=True)
    class WindowOptions(AttentionOptions):
        width: int = positive_int(4, "keys each side")
        mode: str = choice("a", ("a", "b"), "which rule")
        skip: int = nonnegative_int(0, "leading keys never attended")
        sizes: Tuple[int, ...] = positive_int((1, 2), "sizes")
        scale: Optional[float] = option(None, "a scale", minimum=0.0)

    class Windowed(EfficientAttention):
        """A test-only mechanism (never registered)."""

        Options = WindowOptions

    specs = Windowed.options()
    assert list(specs) == ["width", "mode", "skip", "sizes", "scale"]
    assert specs["mode"].choices == ("a", "b") and specs["scale"].type == typing.Optional[float]
    m = Windowed(8, 2, width=2, sizes="3,4", scale=1)
    assert (m.width, m.mode, m.skip, m.sizes, m.scale) == (2, "a", 0, (3, 4), 1.0)
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        Windowed(8, 2, width=0)
    with pytest.raises(TypeError, match=r"unexpected option 'widht' \(did you mean 'width'\?\)"):
        Windowed(8, 2, widht=3)
    assert "width=2" in repr(m)


def test_options_declared_the_old_way_still_work():
    class Legacy(EfficientAttention):
        """A test-only mechanism with a keyword-only option documented in option_help."""

        option_help = {"width": "keys each side"}

        def __init__(self, *args, width: int = 3, **kwargs):
            super().__init__(*args, **kwargs)
            self.width = width

    assert Legacy.options()["width"].default == 3 and Legacy(8, 2, width=5).width == 5
    with pytest.raises(TypeError, match="unexpected option 'wdth'"):
        Legacy(8, 2, wdth=5)
    assert torch.is_tensor(Legacy(8, 2).q_proj.weight)


def test_options_must_be_an_attention_options_dataclass():
    @dataclass(frozen=True)
    class Plain:
        width: int = positive_int(4, "keys each side")

    with pytest.raises(TypeError, match="Plain must be an AttentionOptions subclass"):
        option_specs(Plain)
