"""Profile target for the column-shared layers' TileLang kernels (:mod:`tilesparse.kernels.tilelang_columns`): one
checked launch of both kernels per layer and split count, 16 tokens, all but 6 tile-columns 2:4 (the layers of
``columns_parts.py``), to run under Nsight Compute:

    ncu --clock-control none --kernel-name regex:pair --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section SchedulerStats --section LaunchStats \\
        python3 benchmarks/columns_profile.py

Launch order (as ncu lists them): per layer (4096x11008, then 11008x4096) and per split count (1, then 2): the 2:4
kernel (``pair_kernel``), then the dense kernel (``pair_kernel_1``; one program, :func:`~tilesparse.kernels.tilelang_columns.pair_func`).
"""

from __future__ import annotations

import sys

import torch
from columns_speed import TOL, column_packed

from tilesparse.kernels import tilelang_columns as tc
from tilesparse.kernels.reference import rel_error


def main() -> int:
    bad = 0
    for N, K in ((4096, 11008), (11008, 4096)):
        p = column_packed(N, K, 0, 7, n_sp=K // 128 - 6)
        lay = tc.column_layout(p)
        x = torch.randn(16, K, device="cuda", dtype=p.dtype)
        ref = x.double() @ p.unpack().double().T
        for z in (1, 2):
            cfg = tc.ColumnConfig(16, 64, 1, 6, 128, False, False, splits=z)
            run = tc.prepare(lay, cfg, p.dtype)
            y = torch.empty(16, N, device="cuda", dtype=p.dtype)
            run(x, y)
            torch.cuda.synchronize()
            err = rel_error(y, ref)
            bad += err >= TOL
            print(f"{N}x{K} splits {z}: rel err {err:.1e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
