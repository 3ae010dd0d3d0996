"""Profile target for the hybrid GEMM v10: one launch of each of its best configurations at 64 and 2048 tokens
(4096x11008, all tiles 2:4, bf16; from ``v10.py``'s table), to run under Nsight Compute:

    ncu --clock-control none --kernel-name regex:hybrid_gemm --section SpeedOfLight ... \\
        python3 benchmarks/spikes/gemm_route/v10_profile.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from kernel_speed import random_packed  # noqa: E402

from tilesparse.kernels.format import unpack  # noqa: E402
from tilesparse.kernels.reference import rel_error  # noqa: E402
from v10 import prepare  # noqa: E402

CONFIGS = [(64, 64, 64, 2, 2, 4, 4), (2048, 128, 128, 4, 2, 3, 1)]  # tokens, bm, bt, wm, wn, nst, split


def main() -> int:
    dev = torch.device("cuda")
    N, K = 4096, 11008
    p, _, _ = random_packed(N, K, 1.0, seed=1)
    Wd = unpack(p)
    for M, bm, bt, wm, wn, nst, split in CONFIGS:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        launch = prepare(p, M, bm, bt, wm, wn, nst, split)
        out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        launch(x, out)
        torch.cuda.synchronize()
        print(f"M={M} m{bm} t{bt} w{wm}x{wn} n{nst} s{split}: rel err {rel_error(out, x.double() @ Wd.double().T):.2g}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
