#!/usr/bin/env bash
# Lint, format check and type check, as CI runs them (configuration in pyproject.toml).
#   bash scripts/lint.sh          # in the project-local environment (scripts/setup_env.sh installs ruff and mypy)
#   bash scripts/lint.sh --fix    # apply ruff's fixes and formatting first, then check
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${EA_VENV:-$root/.venv}/bin/python"
cd "$root"
if [ "${1:-}" = --fix ]; then
  "$py" -m ruff check --fix --exit-zero --silent .   # what is left (long lines) is checked after formatting
  "$py" -m ruff format .
fi
"$py" -m ruff check .
"$py" -m ruff format --check .
"$py" -m mypy    # the library, efficient_attention/ ([tool.mypy] files)
