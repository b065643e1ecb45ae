#!/usr/bin/env bash
# After a deliberate upgrade: install the newest versions pyproject.toml allows into .venv-latest/,
# run the test suite on them, and only if it passes write their exact versions to
# recipes/requirements.lock (the file recipes/setup_env.sh installs from). Review and commit the
# lock's diff together with whatever the upgrade needed. Arguments go to tests/run.sh (e.g. --all).
set -euo pipefail
cd "$(dirname "$0")/.."
export LENSSTEER_UNLOCKED=1
VENV=${LENSSTEER_VENV:-.venv-latest}
rm -f "$VENV/.lenssteer-installed"  # always resolve afresh
LENSSTEER_VENV=$VENV bash tests/run.sh "$@"
tmp=$(mktemp recipes/.requirements.lock.XXXXXX)
{
  echo "# Exact versions of the environment the test suite last passed on (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')),"
  echo "# written by recipes/update_lock.sh on $(date -u +%F); recipes/setup_env.sh installs with it as a constraint."
  "$VENV/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$tmp"
mv "$tmp" recipes/requirements.lock
echo "[update_lock] tests passed; recipes/requirements.lock rewritten (git diff recipes/requirements.lock)"
