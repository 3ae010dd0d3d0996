#!/bin/bash
# Hybrid-GEMM route spike on one GPU: sweep.py (a grid of TileLang tile shapes), or the script named by the argument:
# "worklist" (worklist.py, the work-list hybrid), "colshared" (colshared.py, column-shared tile maps); further
# arguments go to the script (e.g. "colshared --fused");
# torch 2.11+cu130, nvcc, Python 3.12, no network.
# Run from the repo root; the wheels (tilelang 0.1.15 and its dependencies, ~60 MiB, made by make_wheels.py)
# lie in $SPIKE_WHEELS (default .gpu/spike21/wheels, an ignored folder carried with the call).
# Output: $OUT/<name>21.log.
set -u
D=$(dirname "$0"); W=${SPIKE_WHEELS:-.gpu/spike21/wheels}; NAME=${1:-sweep}
source $D/env.sh

el "$NAME start"
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-190} timeout 330 python3 $D/$NAME.py "${@:2}" > "$OUT/${NAME}21.log" 2>&1
rc=$?
grep -v "Parallel Compiling\|Elaborating\|TileLang:tilelang\|^\s*$" "$OUT/${NAME}21.log" | tail -80
el "$NAME rc=$rc"
