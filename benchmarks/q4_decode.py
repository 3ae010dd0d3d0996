"""4-bit decode kernel (``hybrid_q4_kernel``, :mod:`tilesparse.kernels.triton_q4`) on LLaMA-2-7B layer shapes:
checked against float64, then timed against cuBLAS on the bf16 weight (GPU).

    PYTHONPATH=src python3 benchmarks/q4_decode.py --out benchmarks/results/q4_decode_h100.md
    PYTHONPATH=src python3 benchmarks/q4_decode.py --check        # correctness only (also CPU + TRITON_INTERPRET=1,
                                                                 # with small --shapes)

Per shape: 45 % of the 128x128 tiles 2:4 at random places, the rest dense; the 2:4 mask by magnitude; round to
nearest at 4 bits, group 128 (bf16 scales, uint8 zero points). Per token count, every candidate configuration of
the kernel (the launcher's default first) is checked against ``x.double() @ W.double().T`` on the dequantized
weight, then timed with a cold L2 inside CUDA graphs (``ops.time_cold``: median over rounds of graph replays,
launch gaps removed), as is ``F.linear`` on the same weight in bf16 (dense). Bytes: ``packed.nbytes()`` (codes,
metadata, scales, zero points, column lists, tables) against the dense bf16 weight; the bytes bound is their
ratio, the speed-up over cuBLAS a kernel reading the packed bytes at cuBLAS's bandwidth would reach; ``% of
bound`` is the best configuration's speed-up over that.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton

from _table import write_table
from tilesparse.kernels.format_q4 import pack_q4, unpack_q4
from tilesparse.kernels.reference import rel_error
from tilesparse.kernels.triton_q4 import q4_linear_triton
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, TileGrid, hybrid_mask
from tilesparse.quant import quantize_rtn

TILE = (128, 128)
TOL = 1e-2  # bf16 output
CANDIDATES = {  # tokens -> launcher keywords (the default, {}, first)
    1: [{}, {"bn": 16, "warps": 8}, {"bn": 4}, {"ts": 4, "td": 2, "pref": True}, {"split": 2}],
    16: [{}, {"dot": False}, {"dot": False, "bn": 8, "warps": 8}, {"bn": 64, "warps": 8}, {"split": 2},
         {"ts": 2, "td": 2, "warps": 8}],
}


def packed_layer(N: int, K: int, frac_sparse: float, group: int, device, seed: int = 0):
    """A random ``[N, K]`` weight under a random tile map (``frac_sparse`` of the tiles 2:4 by magnitude, the rest
    dense), quantized to 4 bits and packed; returns the packed layer and its dequantized weight (float32)."""
    g = torch.Generator().manual_seed(seed)
    grid = TileGrid(N, K, *TILE)
    n = grid.n_rows * grid.n_cols
    kinds = torch.full((n,), DENSE, dtype=torch.int8)
    kinds[torch.randperm(n, generator=g)[:round(frac_sparse * n)]] = SPARSE
    kinds = kinds.reshape(grid.shape)
    W = torch.randn(N, K, generator=g).to(device)
    m24 = topk_mask(W.abs())
    q = quantize_rtn(W, hybrid_mask(kinds, m24, grid), group_size=group)
    p = pack_q4(q.quantized, kinds, m24, TILE)
    return p, unpack_q4(p)


def label(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def check_configs(p, x, ref, cfgs) -> dict:
    """Relative error of every configuration's output against ``ref`` (``inf`` for a launch or compilation that
    raised: reported, and the run goes on)."""
    errs = {}
    for cfg in cfgs:
        try:
            errs[label(cfg)] = rel_error(q4_linear_triton(x, p, None, **cfg), ref)
        except Exception as e:  # noqa: BLE001 - one failing configuration must not hide the others
            print(f"  {label(cfg)}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
            errs[label(cfg)] = float("inf")
    return errs


def time_row(p, Wd, x, cfgs, errs, reps: int, rounds: int) -> dict:
    """Cold-L2 times (us) of F.linear on the bf16 weight and of every configuration that passed its check."""
    from tilesparse.kernels import ops

    dev = x.device
    times = {"cublas": 1e3 * ops.time_cold(lambda: torch.nn.functional.linear(x, Wd), dev, reps, rounds)}
    for cfg in cfgs:
        if errs[label(cfg)] < TOL:
            times[label(cfg)] = 1e3 * ops.time_cold(lambda cfg=cfg: q4_linear_triton(x, p, None, **cfg), dev, reps,
                                                    rounds)
    return times


def table_row(shape: str, M: int, p, errs: dict, times: dict | None) -> dict:
    dense_b = p.out_features * p.in_features * 2
    q4_b = p.nbytes()
    bound = dense_b / q4_b
    row = {"row": f"{shape} M={M}", "dense MB": f"{dense_b / 1e6:.1f}", "q4 MB": f"{q4_b / 1e6:.2f}",
           "bytes bound": f"{bound:.2f}x", "max rel err": f"{max(errs.values()):.1e}"}
    if times:
        ours = {k: v for k, v in times.items() if k != "cublas"}
        best = min(ours, key=ours.get)
        speed = times["cublas"] / ours[best]
        row.update({"cuBLAS us": f"{times['cublas']:.1f}", "q4 default us": f"{ours.get('default', float('nan')):.1f}",
                    "q4 best us": f"{ours[best]:.1f}", "best config": best, "speed-up": f"{speed:.2f}x",
                    "% of bound": f"{100 * speed / bound:.0f} %", "q4 GB/s": f"{q4_b / ours[best] / 1e3:.0f}"})
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in, comma separated")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--sparse", type=float, default=0.45, help="fraction of 2:4 tiles")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--check", action="store_true", help="check only, no timing (runs under TRITON_INTERPRET=1)")
    ap.add_argument("--default-only", action="store_true", help="only the launcher's default configuration")
    ap.add_argument("--reps", type=int, default=20, help="launches per CUDA graph")
    ap.add_argument("--rounds", type=int, default=15, help="graph replays (the median is kept)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.check and not torch.cuda.is_available():
        print("timing needs a CUDA GPU (use --check for a correctness run)")
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = [int(t) for t in args.tokens.split(",") if t]
    rows, failed = [], []
    for shape in [s for s in args.shapes.split(",") if s]:
        N, K = (int(v) for v in shape.split("x"))
        p, W = packed_layer(N, K, args.sparse, args.group, dev)
        Wd = W.to(torch.bfloat16)
        for M in tokens:
            cfgs = CANDIDATES.get(M, [{}])[:1 if args.default_only else None]
            x = torch.randn(M, K, device=dev).to(torch.bfloat16)
            ref = x.double() @ W.double().T
            errs = check_configs(p, x, ref, cfgs)
            failed += [f"{shape} M={M} {k}: {e:.1e}" for k, e in errs.items() if not e < TOL]
            times = None if args.check else time_row(p, Wd, x, cfgs, errs, args.reps, args.rounds)
            rows.append(table_row(shape, M, p, errs, times))
            print(rows[-1], flush=True)
        del p, W, Wd
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (interpreter)"
    head = (f"# 4-bit hybrid decode kernel vs cuBLAS bf16 ({name})\n\n"
            f"Measured {datetime.date.today().isoformat()}, torch {torch.__version__}, triton {triton.__version__}. "
            f"Weights: {100 * args.sparse:.0f} % of the {TILE[0]}x{TILE[1]} tiles 2:4 (magnitude), the rest dense; "
            f"RTN 4-bit, group {args.group}. Times: cold L2, CUDA graphs, median of {args.rounds} replays of "
            f"{args.reps} launches. Bytes bound = dense bf16 bytes / packed bytes; % of bound = speed-up / bound.\n\n"
            f"Command: `PYTHONPATH=src python3 benchmarks/q4_decode.py {' '.join(sys.argv[1:])}`")
    cols = ["dense MB", "q4 MB", "bytes bound", "max rel err"]
    if not args.check:
        cols += ["cuBLAS us", "q4 default us", "q4 best us", "best config", "speed-up", "% of bound", "q4 GB/s"]
    write_table(head, cols, rows, args.out)
    if failed:
        print("FAILED checks (rel err >= %.0e): %s" % (TOL, "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
