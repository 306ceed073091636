"""The Triton kernels on the CPU, through Triton's interpreter (so CI, which has no GPU, runs them), and every
kernel variant those runs launch compiled for an H100 / H200 (sm_90).

The cases live in ``triton_interpreter_cases.py`` and run in a subprocess with
``TRITON_INTERPRET=1``: the variable must be set before the kernels are defined, and must not
reach the real GPU kernels of ``test_kernels_gpu.py`` in the same session.  The interpreter accepts kernels
the GPU compiler rejects (a global that is not a ``tl.constexpr``, a product with a side under 16, too much
shared memory), so ``sm90_compile.py`` records each distinct launch and builds it with Triton's compiler for
sm_90, registers and shared memory checked.  Skipped where Triton is not installed (``scripts/setup_env.sh``
installs it).
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
SHAPE_LENGTHS = ["1024", "8192"]  # record-shapes' lengths in CI


def _run(args, tmp, interpret: bool, timeout: int, **extra_env):
    """``python *args`` in a subprocess, under Triton's interpreter or not, with its own Triton cache in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_CACHE_DIR=os.path.join(tmp, "triton-cache"), **extra_env)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, tmp, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The interpreter cases, run once with their launches recorded: ``(the run, the recording's path)``."""
    tmp = str(tmp_path_factory.mktemp("interpreter"))
    path = os.path.join(tmp, "cases.pkl")
    run = _run([os.path.join(HERE, "triton_interpreter_cases.py")], tmp, True, 900, EA_SM90_RECORD=path)
    return run, path, tmp


def test_triton_kernels_in_interpreter_match_reference(recorded):
    run, _, _ = recorded
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "cases passed" in run.stdout


def _compiles(path, tmp):
    assert os.path.exists(path), "nothing was recorded"
    run = _run([os.path.join(HERE, "sm90_compile.py"), "compile", path], tmp, interpret=False, timeout=1500)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert "kernel variants compile for sm_90" in run.stdout


def test_interpreter_cases_kernels_compile_for_sm90(recorded):
    _, path, tmp = recorded
    _compiles(path, tmp)


def test_mechanisms_kernels_compile_for_sm90(tmp_path):
    """Every mechanism's training (and decoding) step in CAB's head shape, bf16: the variants the benchmarks use."""
    path = str(tmp_path / "mechanisms.pkl")
    run = _run(
        [os.path.join(HERE, "sm90_compile.py"), "record-mechanisms", path, "--length", "128"], str(tmp_path), True, 900
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    _compiles(path, str(tmp_path))


def test_benchmark_shapes_kernels_compile_for_sm90(tmp_path):
    """CAB's setting ``(L, 4, 512)`` at the lengths the benchmarks run, the kernels recorded without running: the
    tiles, segments and TMA loads chosen for long sequences on an H200, which the probes' tiny inputs never reach."""
    path = str(tmp_path / "shapes.pkl")
    args = [os.path.join(HERE, "sm90_compile.py"), "record-shapes", path, "--lengths", *SHAPE_LENGTHS]
    run = _run(args, str(tmp_path), True, 1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    _compiles(path, str(tmp_path))


def test_compile_check_catches_a_kernel_the_interpreter_runs(tmp_path):
    """The check itself: a kernel reading a plain Python global runs under the interpreter but cannot compile."""
    source = tmp_path / "bad_kernel.py"
    source.write_text(
        "import triton\nimport triton.language as tl\n\nSCALE = 2.0\n\n\n"
        "@triton.jit\ndef scale(X, N, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    tl.store(X + offs, tl.load(X + offs, mask=offs < N) * SCALE, mask=offs < N)\n"
    )
    record = (
        "import sys, torch\nfrom sm90_compile import recording\nimport bad_kernel\n"
        "x = torch.ones(8)\n"
        "with recording(sys.argv[1]):\n    bad_kernel.scale[(1,)](x, 8, BLOCK=16)\n"
        "assert x.sum().item() == 16.0\n"
    )
    path = str(tmp_path / "bad.pkl")
    run = _run(["-c", record, path], str(tmp_path), True, 300)
    assert run.returncode == 0, run.stderr[-4000:]
    run = _run([os.path.join(HERE, "sm90_compile.py"), "compile", path], str(tmp_path), False, 300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "scale" in run.stdout and "SCALE" in run.stdout, run.stdout
