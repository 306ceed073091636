#!/usr/bin/env bash
# Create (or refresh) the project-local environment in .venv and install the
# library into it.  Idempotent: a second run only checks what is there.
#
#   bash scripts/setup_env.sh          # library + fairseq + test tools
#
# Environment knobs:
#   EA_VENV=path            where the environment lives (default: <repo>/.venv)
#   EA_SKIP_FAIRSEQ=1       do not install fairseq (the library itself never needs it)
#   EA_BUILD_EXT=0          do not build the C++ CPU kernels (pure-PyTorch fallback)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EA_VENV:-$root/.venv}"
py="$venv/bin/python"

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$py" ]; then
  log "creating virtual environment in $venv"
  python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
fi
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

# torch first, pinned: the CPU wheel of 2.13.0 is what this project is tested with.
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  log "installing torch 2.13.0 (CPU)"
  pip_install torch==2.13.0
fi

log "installing build and test tools"
pip_install "numpy<2" "setuptools>=64" wheel ninja cython pytest pytest-timeout hypothesis matplotlib
# linter/formatter and type checker, pinned (scripts/lint.sh; a newer ruff may add rules and reformat)
pip_install ruff==0.17.6 mypy==2.4.1
# Triton (the GPU kernels' compiler; the version on the H100 the kernels are tuned on): on a machine
# without a GPU the tests run the kernels through its interpreter (tests/test_kernels_triton_interpreter.py).
pip_install triton==3.6.0

if [ "${EA_SKIP_FAIRSEQ:-0}" != 1 ]; then
  if ! "$py" -c 'import fairseq' 2>/dev/null; then
    # fairseq 0.12.2 does not import on Python 3.11; fairseq-fixed is the same
    # package fixed for it.  It is installed without its declared dependencies
    # because one of them (torchaudio) pulls a torch build that cannot load
    # beside torch 2.13 CPU; the ones fairseq needs at run time are listed here.
    log "installing fairseq (fairseq-fixed==0.12.3.1, ~4 minutes to build)"
    pip_install cffi "hydra-core==1.3.2" "omegaconf==2.3.0" regex "sacrebleu>=1.4.12" tqdm bitarray scikit-learn packaging
    pip_install --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
  fi
fi

log "installing efficient-attention (editable)"
EA_BUILD_EXT="${EA_BUILD_EXT:-1}" pip_install --no-build-isolation --no-deps -e "$root"
log "environment ready: $venv"
