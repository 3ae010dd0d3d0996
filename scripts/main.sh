#!/usr/bin/env bash
# The main job on the embedded default: set up (idempotent), then evaluate the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tilesparse eval "$@"
