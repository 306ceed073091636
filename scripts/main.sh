#!/usr/bin/env bash
# The main job: set up the project-local environment, then train fairseq LMs with
# several mechanisms on a synthetic copy corpus, generate with them, and print a
# table of copy accuracy against chance (examples/fairseq/main_job.py; a few
# minutes on two cores after setup; one thread per fairseq process).
#   bash scripts/main.sh [main_job.py args...]   (--help lists them)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # main_job.py gives each fairseq process --threads (default 1)
exec "${EA_VENV:-$root/.venv}/bin/python" examples/fairseq/main_job.py "$@"
