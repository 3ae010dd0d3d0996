#!/bin/bash
# Hybrid-GEMM route spike, work-list form (worklist.py) on one GPU; torch 2.11+cu130, nvcc, Python 3.12, no network.
# Run from the repo root; the wheels as for sweep.sh ($SPIKE_WHEELS, default .gpu/spike21/wheels).
# Output: $OUT/worklist21.log.
set -u
D=$(dirname "$0"); W=${SPIKE_WHEELS:-.gpu/spike21/wheels}
source $D/env.sh

el "worklist start"
SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-240} timeout 330 python3 $D/worklist.py > "$OUT/worklist21.log" 2>&1
rc=$?
grep -v "Parallel Compiling\|Elaborating\|TileLang:tilelang\|^\s*$" "$OUT/worklist21.log" | tail -80
el "worklist rc=$rc"
