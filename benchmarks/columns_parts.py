"""Where a column-shared layer's time goes on the GPU: the TileLang route's two kernels alone and together, against
cuBLAS on the masked weight, with the bytes each moves.

    PYTHONPATH=src:benchmarks python3 benchmarks/columns_parts.py [--dense-cols 6] [--tokens 16,64]

Layers: LLaMA-2-7B's 4096x11008 and 11008x4096 with all but ``--dense-cols`` tile-columns 2:4; the 16-64-token
configuration (16 or 64 tokens x 64 rows per block, one tile-column per step, 6 stages) with the 2:4 steps in
``--splits`` ranges (split-K: the dense kernel sums the partials), ``--blocks-per-sm`` resident 2:4 blocks asked
of ``nvcc`` and ``--pdl`` (the dense kernel as a programmatic dependent launch that runs its steps before
waiting). Each variant's layer output is checked against float64 first (on a NaN-filled output). Times:
``ops.time_cold`` (CUDA graphs, L2 flushed, median). "both kernels": the layer as the library runs it (one
TileLang program); last column: cuBLAS's time over the layer's, and that over the bytes bound
``1 / (1 - 0.4375 f)`` (``f`` the 2:4 share of the tile-columns).
"""

from __future__ import annotations

import argparse

import torch
from columns_speed import TOL, column_packed

from tilesparse.kernels import ops
from tilesparse.kernels import tilelang_columns as tc
from tilesparse.kernels.reference import rel_error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense-cols", type=int, default=6)
    ap.add_argument("--tokens", default="16,64")
    ap.add_argument("--splits", default="1,2")
    ap.add_argument("--blocks-per-sm", default="1")
    ap.add_argument("--shapes", default="4096x11008,11008x4096", help="out x in, comma-separated")
    ap.add_argument("--pdl", default="0", help="0, 1 or 0,1")
    a = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | tokens | 2:4 / dense tile-columns | splits | 2:4 blocks per SM | pdl | error | both kernels us | "
          "gemm_sp alone us (MB, TB/s) | dense part alone us (MB) | cuBLAS us (MB, TB/s) | vs cuBLAS (of the bound) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    combos = [(int(v), int(s), int(o), bool(int(d))) for v in a.tokens.split(",") for s in a.splits.split(",")
              for o in a.blocks_per_sm.split(",") for d in a.pdl.split(",")]
    cfgs = [tc.ColumnConfig(M, 64, 1, 6, 128, False, False, splits=z, blocks_per_sm=b, pdl=d) for M, z, b, d in combos]
    tc.precompile([k for c in cfgs for k in tc.kernel_params(c, 128, torch.bfloat16) + tc.launch_keys(c, 128, torch.bfloat16)])
    for N, K in (tuple(int(d) for d in v.split("x")) for v in a.shapes.split(",")):
        p = column_packed(N, K, 0, 7, n_sp=K // 128 - a.dense_cols)
        lay = tc.column_layout(p)
        w = p.unpack().to(p.dtype)
        for M, z, b, d in combos:
            cfg = tc.ColumnConfig(M, 64, 1, 6, 128, False, False, splits=z, blocks_per_sm=b, pdl=d)
            keys = tc.kernel_params(cfg, 128, p.dtype)
            sp, dn = tc.kernel(*keys[0]), tc.kernel(*keys[1])
            x = torch.randn(M, K, device="cuda", dtype=p.dtype)
            y_chk = torch.full((M, N), float("nan"), device="cuda", dtype=p.dtype)  # read before written: NaN
            layer = tc.prepare(lay, cfg, p.dtype)  # both kernels as one program
            layer(x, y_chk)
            err = rel_error(y_chk, x.double() @ w.double().T)
            bad += err >= TOL
            y = torch.empty(M, N, device="cuda", dtype=p.dtype)
            part = torch.empty(z, M, N, device="cuda", dtype=torch.float32)
            sp_out, dn_out = (y, (y,)) if z == 1 else (part, (part, y))

            def run_sp(x=x, sp=sp, lay=lay, o=sp_out):
                sp(lay.ws, lay.e16, lay.sp_tc, x, o)

            def run_dn(x=x, dn=dn, lay=lay, o=dn_out):
                dn(lay.wd, lay.dn_tc, x, *o)

            def run_both(layer=layer, x=x, y=y):
                layer(x, y)

            t_all, t_sp, t_dn = (ops.time_cold(f, x.device) for f in (run_both, run_sp, run_dn))
            t_d = ops.time_cold(lambda x=x, w=w: torch.nn.functional.linear(x, w), x.device)
            sb, db, wb = (lay.ws.numel() + lay.e16.numel()) * 2, lay.wd.numel() * 2, N * K * 2
            bound = 1 / (1 - 0.4375 * lay.n_sp / (lay.n_sp + lay.n_dn))  # dense bytes over the layer's bytes
            print(f"| {N}x{K} | {M} | {lay.n_sp} / {lay.n_dn} | {z} | {b} | {int(d)} | {err:.1e} | {t_all * 1e3:.1f} | "
                  f"{t_sp * 1e3:.1f} "
                  f"({sb / 1e6:.1f}, {sb / t_sp / 1e9:.2f}) | {t_dn * 1e3:.1f} ({db / 1e6:.1f}) | "
                  f"{t_d * 1e3:.1f} ({wb / 1e6:.1f}, {wb / t_d / 1e9:.2f}) | {t_d / t_all:.2f}x ({t_d / t_all / bound:.0%}) |",
                  flush=True)
    print(f"checks: {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
