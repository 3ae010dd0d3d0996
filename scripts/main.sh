#!/usr/bin/env bash
# The main job: set up (idempotent), then run the default recipe (or the recipe given as argument).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TILESPARSE_VENV:-.venv}/bin/tilesparse" run "$@"
