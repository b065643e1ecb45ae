#!/usr/bin/env bash
# The test command: installs what the tests need (recipes/setup_env.sh: the locked versions into
# .venv/, idempotent), then runs pytest. By default the fast tests plus a representative few
# real-model tests (marked 'ci'); `tests/run.sh --all` runs every slow real-model test too. Extra
# arguments go to pytest. LENSSTEER_UNLOCKED=1 runs the same on the newest versions pyproject.toml
# allows, in .venv-latest/ (recipes/update_lock.sh does that and then rewrites the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup_env.sh
if [ "${LENSSTEER_UNLOCKED:-0}" = 1 ]; then VENV=${LENSSTEER_VENV:-.venv-latest}; else VENV=${LENSSTEER_VENV:-.venv}; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle threads sleep: fast on a shared CPU
marker=(-m "not slow or ci")
if [ "${1:-}" = "--all" ]; then
  marker=()
  shift
fi
set +e
"$VENV/bin/python" -m pytest "${marker[@]}" "$@"
status=$?
set -e
# pytest's 5 means "no test collected": with a -k that matches nothing, say so instead of passing.
if [ "$status" = 5 ]; then echo "[tests] no test was collected" >&2; fi
exit "$status"
