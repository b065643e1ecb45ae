#!/usr/bin/env bash
# The main job on a fresh machine: install everything into .venv/ at the locked versions (once), then
# run the quickstart recipe on the default bundled model. Arguments go to recipes/quickstart.py (see
# --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle threads sleep: fast on a shared CPU
exec "${LENSSTEER_VENV:-.venv}/bin/python" recipes/quickstart.py "$@"
