#!/usr/bin/env bash
# Run the whole test suite in the project-local environment (created if missing).
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
# fairseq-dependent tests must run, not skip, here
export EA_REQUIRE_FAIRSEQ="${EA_REQUIRE_FAIRSEQ:-1}"
exec "${EA_VENV:-$root/.venv}/bin/python" -m pytest -ra "$@"
