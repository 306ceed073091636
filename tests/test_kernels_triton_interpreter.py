"""The Triton kernels on the CPU, through Triton's interpreter (so CI, which has no GPU, runs them).

The cases live in ``triton_interpreter_cases.py`` and run in a subprocess with
``TRITON_INTERPRET=1``: the variable must be set before the kernels are defined, and must not
reach the real GPU kernels of ``test_kernels_gpu.py`` in the same session.  Skipped where Triton
is not installed (``scripts/setup_env.sh`` installs it).
"""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.slow,
]

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_in_interpreter_match_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_interpreter_cases.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "cases passed" in run.stdout
