#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with CPU torch 2.13.0 (pinned), tilesparse and its
# test tools, then the embedded default model and texts in the cache. A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TILESPARSE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.tilesparse-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch==2.13.0 (CPU) and tilesparse[dev]"
  pip_install() {  # hide pip's notes about this machine's unused local index folders
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
  }
  pip_install torch==2.13.0
  pip_install -e ".[dev]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/tilesparse" fetch
"$VENV/bin/python" -c "from tilesparse.evaluation.zeroshot import prepare_tasks; prepare_tasks()"
