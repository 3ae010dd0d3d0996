"""Profile target for the 4-bit mma kernel (:mod:`tilesparse.kernels.cuda_mma_q4`): one checked launch of each
configuration below on 11008x4096 at one token (45 % of the 128x128 tiles 2:4, RTN 4-bit, group 128; the layer of
``q4_decode.py``), to run under Nsight Compute:

    ncu --clock-control none --kernel-name regex:hybrid_mma_q4 --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section SchedulerStats --section LaunchStats \\
        --section InstructionStats python3 benchmarks/q4_profile.py

Configurations: the library's default for the layer, twice the codes per warp in registers (``sb=4``) and the
shared-memory pipeline (``qst=4``).
"""

from __future__ import annotations

import sys

import torch
from q4_decode import TOL, packed_layer

from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import cuda_mma_q4 as cq
from tilesparse.kernels.reference import rel_error


def main() -> int:
    dev = torch.device("cuda")
    p, W = packed_layer(11008, 4096, 0.45, 128, dev)
    x = torch.randn(1, 4096, device=dev).to(torch.bfloat16)
    ref = x.double() @ W.double().T
    default = cq.default_config(1, p, cm._sm_count(dev))
    bad = 0
    for cfg in (default, {**default, "sb": 4}, {**default, "qst": 4}):
        y = cq.q4_mma_linear(x, p, None, **cfg)
        torch.cuda.synchronize()
        err = rel_error(y, ref)
        bad += not err < TOL
        print(f"{cfg}: rel err {err:.2g}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
