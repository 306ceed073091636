#!/usr/bin/env bash
# The main job: set up the project-local environment, then run the demo.
#   bash scripts/main.sh [demo args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${EA_VENV:-$root/.venv}/bin/python" examples/quickstart.py "$@"
