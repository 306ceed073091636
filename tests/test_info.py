"""``python -m efficient_attention info``: versions, kernel backends and mechanisms of this installation."""

import subprocess
import sys
from pathlib import Path

import torch

from efficient_attention import available_attentions, capability_table
from efficient_attention.__main__ import main
from efficient_attention.info import environment_report, format_report
from efficient_attention.kernels import dispatchers
from efficient_attention.kernels._loader import cpu_extension, cpu_extension_reason
from efficient_attention.kernels.dispatch import triton_reason

ROOT = Path(__file__).resolve().parents[1]


def test_report_versions_and_backends_match_the_library():
    report = environment_report()
    assert report.versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report.versions["efficient-attention"]
    by_name = {b.name: b for b in report.backends}
    cpp, triton = by_name["cpp"], by_name["triton"]
    assert cpp.usable == (cpu_extension() is not None)
    assert cpp.reason == cpu_extension_reason()
    assert triton.usable == (triton_reason() is None)
    assert triton.usable or triton_reason() in triton.reason
    assert by_name["reference"].usable and by_name["chunked"].usable
    for b in report.backends:
        assert b.usable or b.reason, f"{b.name} is not usable but gives no reason"


def test_backends_are_listed_from_the_dispatchers_classes():
    report = environment_report()
    listed = {b.name: set(b.ops) for b in report.backends}
    declared = {}
    for op, dispatcher in dispatchers().items():
        for cls in dispatcher.backends:
            declared.setdefault(cls.name, set()).add(op)
    assert listed == declared
    assert [b.name for b in report.backends] == ["triton", "cpp", "chunked", "reference"]


def test_every_mechanism_is_listed_with_its_capabilities():
    report = environment_report()
    infos = available_attentions()
    assert [m.name for m in report.mechanisms] == list(infos)
    for m in report.mechanisms:
        caps = infos[m.name].capabilities
        assert m.patterns == caps.pattern_names()
        assert m.weights == caps.need_weights
        assert (m.decoding != "no") == caps.incremental
        if not any(b in ("sdpa", "triton") or b.startswith("kernels") for b in caps.backends):
            assert m.fast_here == ()
        triton = next(b for b in report.backends if b.name == "triton")
        if "triton" in caps.backends:  # a mechanism's own Triton kernels are listed where Triton runs
            assert ("Triton GPU kernels" in m.fast_here) == triton.usable
        assert len(set(m.fast_here)) == len(m.fast_here)


def test_fast_paths_follow_the_backends():
    report = environment_report()
    cpp = next(b for b in report.backends if b.name == "cpp")
    local = next(m for m in report.mechanisms if m.name == "local")
    assert ("C++ CPU kernels" in local.fast_here) == cpp.usable
    vanilla = next(m for m in report.mechanisms if m.name == "vanilla")
    assert any("sdpa" in f for f in vanilla.fast_here)


def test_format_names_every_mechanism_and_every_unusable_reason():
    report = environment_report()
    text = format_report(report)
    for m in report.mechanisms:
        assert f"  {m.name} " in text
    for b in report.backends:
        assert b.name in text
        if not b.usable:
            assert b.reason in text


def test_main_prints_info_and_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernel backends" in out and "torch" in out
    assert main([]) == 0
    assert capsys.readouterr().out.strip() == capability_table().strip()


def test_python_m_info_and_help_run():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "efficient_attention", "info"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    assert "versions:" in out.stdout and "mechanisms:" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "efficient_attention", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    assert "info" in out.stdout and "table" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "efficient_attention", "inf"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_main_prints_every_option_from_the_spec(capsys):
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    for name, info in available_attentions().items():
        assert f"{name} ({info.cls.__name__}):" in out
        for opt in info.options.values():
            assert opt.name in out and opt.help in out and opt.describe() in out
    assert main(["options", "favor"]) == 0  # an alias
    out = capsys.readouterr().out
    assert out.startswith("performer (Performer):") and "a positive integer      number of random features m" in out
