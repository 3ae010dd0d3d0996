#!/bin/bash
# Hybrid-GEMM route spike on one GPU (sweep.py: a grid of TileLang tile shapes); torch 2.11+cu130, nvcc, Python 3.12, no network.
# Run from the repo root; the wheels (tilelang 0.1.15 and its dependencies, ~60 MiB, made by make_wheels.py)
# lie in $SPIKE_WHEELS (default .gpu/spike21/wheels, an ignored folder carried with the call).
# Output: $OUT/sweep21.log.
set -u
D=$(dirname "$0"); W=${SPIKE_WHEELS:-.gpu/spike21/wheels}
source $D/env.sh

el "sweep start"
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-190} timeout 260 python3 $D/sweep.py > "$OUT/sweep21.log" 2>&1
rc=$?
grep -v "Parallel Compiling\|Elaborating\|TileLang:tilelang\|^\s*$" "$OUT/sweep21.log" | tail -60
el "sweep rc=$rc"
