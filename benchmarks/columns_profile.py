"""Profile target for the column-shared layers' TileLang kernels (:mod:`tilesparse.kernels.tilelang_columns`): one
checked launch of the layer per shape and variant, all but 6 tile-columns 2:4 (the layers of ``columns_parts.py``),
to run under Nsight Compute:

    ncu --clock-control none --kernel-name regex:pair --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section SchedulerStats --section LaunchStats \\
        python3 benchmarks/columns_profile.py [--tokens 16] [--splits 1,2] [--pdl 0] [--blocks-per-sm 1]

Launch order (as ncu lists them): per layer (4096x11008, then 11008x4096) and per variant (splits, then blocks
per SM, then pdl, in the order given): the 2:4 kernel (``pair_kernel``), then the dense kernel
(``pair_kernel_1``; one program, :func:`~tilesparse.kernels.tilelang_columns.pair_func`).
"""

from __future__ import annotations

import argparse
import sys

import torch
from columns_speed import TOL, column_packed

from tilesparse.kernels import tilelang_columns as tc
from tilesparse.kernels.reference import rel_error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16, help="16, 32 or 64 (the block's tokens)")
    ap.add_argument("--splits", default="1,2")
    ap.add_argument("--blocks-per-sm", default="1")
    ap.add_argument("--pdl", default="0")
    a = ap.parse_args()
    M = a.tokens
    variants = [(int(z), int(b), bool(int(d))) for z in a.splits.split(",") for b in a.blocks_per_sm.split(",")
                for d in a.pdl.split(",")]
    bad = 0
    for N, K in ((4096, 11008), (11008, 4096)):
        p = column_packed(N, K, 0, 7, n_sp=K // 128 - 6)
        lay = tc.column_layout(p)
        x = torch.randn(M, K, device="cuda", dtype=p.dtype)
        ref = x.double() @ p.unpack().double().T
        for z, b, d in variants:
            cfg = tc.ColumnConfig(M, 64, 1, 6, 128, False, False, splits=z, blocks_per_sm=b, pdl=d)
            run = tc.prepare(lay, cfg, p.dtype)
            y = torch.full((M, N), float("nan"), device="cuda", dtype=p.dtype)
            run(x, y)
            torch.cuda.synchronize()
            err = rel_error(y, ref)
            bad += err >= TOL
            print(f"{N}x{K} {M} tokens, splits {z}, {b} blocks per SM, pdl {int(d)}: rel err {err:.1e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
