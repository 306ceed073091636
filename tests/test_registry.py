"""The registry, the capability table, the README's table and import hygiene."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import efficient_attention as ea
from efficient_attention import available_attentions, build_attention, capability_table, register_attention

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "efficient_attention"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == capability_table().strip()
    for name in available_attentions():
        assert f"`{name}`" in out.stdout


def test_readme_table_agrees_with_registry():
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- mechanisms:start -->\n(.*?)\n<!-- mechanisms:end -->", text, re.S)
    assert match, "README.md must hold the mechanism table between the mechanisms:start/end markers"
    assert match.group(1).strip() == capability_table().strip(), (
        "README.md's mechanism table is stale; regenerate it with `python -m efficient_attention`"
    )


def test_import_does_not_import_fairseq_or_paragen():
    code = (
        "import sys, efficient_attention; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fairseq', 'paragen')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_every_registered_class_is_exported():
    for info in available_attentions().values():
        assert getattr(ea, info.cls.__name__) is info.cls, (
            f"{info.cls.__name__} is not exported from efficient_attention"
        )


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError) as exc:
        build_attention("no-such-attention", embed_dim=8, num_heads=2)
    for name in available_attentions():
        assert name in str(exc.value)


def test_aliases_and_case():
    assert type(build_attention("Vanilla", embed_dim=8, num_heads=2)) is ea.MultiheadAttention
    assert type(build_attention("multihead", embed_dim=8, num_heads=2)) is ea.MultiheadAttention


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):

        @register_attention("vanilla")
        class Impostor(ea.EfficientAttention):
            pass


def test_registering_a_non_attention_fails():
    with pytest.raises(TypeError):
        register_attention("thing")(object)


def test_option_without_help_is_rejected():
    with pytest.raises(TypeError, match="option_help has no entry for option 'width'"):

        @register_attention("undocumented_test_mechanism")
        class Undocumented(ea.EfficientAttention):
            def __init__(self, *args, width: int = 3, **kwargs):
                super().__init__(*args, **kwargs)


def test_available_attentions_reports_capabilities_and_options():
    info = available_attentions()["vanilla"]
    assert info.capabilities.need_weights and info.capabilities.incremental
    assert "num_kv_heads" in info.options
    assert {"multihead", "softmax"} <= set(info.aliases)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError) as exc:
        build_attention("perfomer", embed_dim=8, num_heads=2)
    assert "did you mean 'performer'" in str(exc.value)
    assert not str(exc.value).startswith("'")  # a sentence, not the repr KeyError gives by default
    with pytest.raises(KeyError) as exc:
        build_attention("zzzzzz", embed_dim=8, num_heads=2)
    assert "did you mean" not in str(exc.value)


def test_did_you_mean():
    from efficient_attention.registry import did_you_mean

    assert did_you_mean("wsise", ["wsize", "causal"], prefix="--attn_") == " (did you mean '--attn_wsize'?)"
    assert did_you_mean("xyz", ["wsize"]) == ""
