#!/usr/bin/env bash
# The test command: installs what the tests need into .venv/ (recipes/setup_env.sh, idempotent),
# then runs pytest. By default the fast tests plus a representative few real-model tests (marked
# 'ci'); `tests/run.sh --all` runs every slow real-model test too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
marker=(-m "not slow or ci")
if [ "${1:-}" = "--all" ]; then
  marker=()
  shift
fi
exec .venv/bin/python -m pytest "${marker[@]}" "$@"
