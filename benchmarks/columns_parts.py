"""Where a column-shared layer's time goes on the GPU: the TileLang route's two kernels alone and together, against
cuBLAS on the masked weight, with the bytes each moves.

    PYTHONPATH=src:benchmarks python3 benchmarks/columns_parts.py [--dense-cols 6] [--tokens 16,64]

Layers: LLaMA-2-7B's 4096x11008 and 11008x4096 with all but ``--dense-cols`` tile-columns 2:4; one configuration
(16 or 64 tokens x 64 rows per block, one tile-column per step, 6 stages: the fastest of ``columns_speed.py`` at
16-64 tokens). Times: ``ops.time_cold`` (CUDA graphs, L2 flushed, median).
"""

from __future__ import annotations

import argparse

import torch
from columns_speed import column_packed

from tilesparse.kernels import ops
from tilesparse.kernels import tilelang_columns as tc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense-cols", type=int, default=6)
    ap.add_argument("--tokens", default="16,64")
    a = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | tokens | 2:4 / dense tile-columns | both kernels us | gemm_sp alone us (MB, TB/s) | "
          "dense part alone us (MB) | cuBLAS us (MB, TB/s) |")
    print("|---|---|---|---|---|---|---|")
    for N, K in ((4096, 11008), (11008, 4096)):
        p = column_packed(N, K, 0, 7, n_sp=K // 128 - a.dense_cols)
        lay = tc.column_layout(p)
        w = p.unpack().to(p.dtype)
        for M in (int(v) for v in a.tokens.split(",")):
            keys = tc.kernel_params(tc.ColumnConfig(M, 64, 1, 6, 128, False, False), 128, p.dtype)
            sp, dn = tc.kernel(*keys[0]), tc.kernel(*keys[1])
            x = torch.randn(M, K, device="cuda", dtype=p.dtype)
            y = torch.empty(M, N, device="cuda", dtype=p.dtype)

            def run_sp(x=x, y=y, sp=sp, lay=lay):
                sp(lay.ws, lay.e16, lay.sp_tc, x, y)

            def run_dn(x=x, y=y, dn=dn, lay=lay):
                dn(lay.wd, lay.dn_tc, x, y)

            def run_both(run_sp=run_sp, run_dn=run_dn):
                run_sp()
                run_dn()

            t_all, t_sp, t_dn = (ops.time_cold(f, x.device) for f in (run_both, run_sp, run_dn))
            t_d = ops.time_cold(lambda x=x, w=w: torch.nn.functional.linear(x, w), x.device)
            sb, db, wb = (lay.ws.numel() + lay.e16.numel()) * 2, lay.wd.numel() * 2, N * K * 2
            print(f"| {N}x{K} | {M} | {lay.n_sp} / {lay.n_dn} | {t_all * 1e3:.1f} | {t_sp * 1e3:.1f} "
                  f"({sb / 1e6:.1f}, {sb / t_sp / 1e9:.2f}) | {t_dn * 1e3:.1f} ({db / 1e6:.1f}) | "
                  f"{t_d * 1e3:.1f} ({wb / 1e6:.1f}, {wb / t_d / 1e9:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
