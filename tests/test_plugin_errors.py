"""Configuration mistakes in the fairseq path end the program with one line, not a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_fairseq

ROOT = Path(__file__).resolve().parents[1]
CODE = """
from efficient_fairseq.options import install_user_error_hook, user_error
install_user_error_hook()
{raise_}
"""


def _run(raise_, **env):
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins")]), **env)
    return subprocess.run(
        [sys.executable, "-c", CODE.format(raise_=raise_)], capture_output=True, text=True, cwd=ROOT, env=full
    )


@pytest.fixture(autouse=True)
def _fairseq():
    require_fairseq()


def test_marked_errors_print_one_line():
    proc = _run("raise user_error(ValueError('--attn-wsize is set but no attention has it'))")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error: --attn-wsize is set but no attention has it" in proc.stderr


def test_traceback_on_demand_and_for_other_errors():
    proc = _run("raise user_error(ValueError('bad option'))", EA_TRACEBACK="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = _run("raise RuntimeError('a bug')")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_resolve_role_errors_are_marked_and_suggest():
    from types import SimpleNamespace

    from efficient_fairseq.options import resolve_role

    with pytest.raises(ValueError, match=r"did you mean 'performer'") as exc:
        resolve_role(SimpleNamespace(decoder_attention="perfomer"), "decoder", ("attn",))
    assert getattr(exc.value, "_efficient_fairseq_user_error", False)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
