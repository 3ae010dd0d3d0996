#!/bin/bash
# Hybrid-GEMM route spike on one GPU (spike.py: every route at its default tiles); torch 2.11+cu130, nvcc, Python 3.12, no network.
# Run from the repo root; the wheels (tilelang 0.1.15 and its dependencies, ~60 MiB, made by make_wheels.py)
# lie in $SPIKE_WHEELS (default .gpu/spike21/wheels, an ignored folder carried with the call).
# Output: $OUT/spike21.log.
set -u
D=$(dirname "$0"); W=${SPIKE_WHEELS:-.gpu/spike21/wheels}
source $D/env.sh

# 2. the spike (its own budget: SPIKE_BUDGET_S, default 230 s; hard stop at 300 s)
el "spike start"
timeout 300 python3 $D/spike.py > "$OUT/spike21.log" 2>&1
rc=$?
grep -v "Parallel Compiling\|Elaborating\|TileLang:tilelang.jit.kernel:INFO\|^\s*$" "$OUT/spike21.log" | tail -150
el "spike rc=$rc"
