#!/usr/bin/env bash
# The main job: set up the project-local environment, then train, evaluate and
# generate with fairseq LMs using several mechanisms on a bundled synthetic
# corpus, and print a comparison table (examples/fairseq/main_job.py).
#   bash scripts/main.sh [main_job.py args...]   (--help lists them)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${EA_VENV:-$root/.venv}/bin/python" examples/fairseq/main_job.py "$@"
