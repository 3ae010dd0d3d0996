"""4-bit decode kernels on LLaMA-2-7B layer shapes: the Triton kernel (``hybrid_q4_kernel``,
:mod:`tilesparse.kernels.triton_q4`) and the sparse-tensor-core kernel (:mod:`tilesparse.kernels.cuda_mma_q4`),
checked against float64, then timed against cuBLAS on the bf16 weight (GPU).

    PYTHONPATH=src python3 benchmarks/q4_decode.py --out benchmarks/results/q4_decode_h100.md
    PYTHONPATH=src python3 benchmarks/q4_decode.py --check        # correctness only (also CPU + TRITON_INTERPRET=1,
                                                                 # with small --shapes)

Per shape and ``--sparse`` fraction (default 0 and 0.45: the 4-bit dense baseline and the 45 % hybrid through the
same kernels, in the same run): that share of the 128x128 tiles 2:4 at random places, the rest dense; the 2:4 mask
by magnitude; round to
nearest at 4 bits, group 128 (bf16 scales, uint8 zero points). Per token count, every candidate configuration of
the Triton kernel (the launcher's default first) and, where it applies (compute capability 8.0+, ``cuda-bindings``),
a few of the mma kernel's (``default_config`` first; this check is the one that verifies that kernel on a GPU) are
checked against ``x.double() @ W.double().T`` on the dequantized weight -- a failing configuration is reported,
left out of the timing and makes the exit status 1, the run goes on -- then timed with a cold L2 inside CUDA
graphs (``ops.time_cold``: median over rounds of graph replays, launch gaps removed), as is ``F.linear`` on the
same weight in bf16 (dense). Bytes: ``packed.nbytes()`` (codes, metadata, scales, zero points, column lists,
tables) against the dense bf16 weight; the bytes bound is their ratio, the speed-up over cuBLAS a kernel reading
the packed bytes at cuBLAS's bandwidth would reach. ``speed-up``, ``% of bound`` and ``q4 GB/s`` are the best
configuration's of either kernel; ``q4 best`` is the Triton kernel's best, ``mma best`` the mma kernel's (which
reads its parameter table, 4 bytes per row and group, where the packed layer counts 3 for scale and zero point).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton

from _table import write_table
from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import cuda_mma_q4 as cq
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
MMA_CANDIDATES = {  # tokens -> q4_mma_linear keywords over default_config's (the default, {}, first)
    1: [{}, {"sb": 1}, {"split": 2}, {"qst": 4}],
    16: [{}, {"sb": 1}, {"split": 2}, {"qst": 3}],
}
# qst > 0 keeps qst - 1 batches in flight through shared memory instead of the next one in registers. The default's
# split-K fills one wave of resident blocks; split=2 is about two blocks per multiprocessor on 11008x4096 (132 SMs).


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


def triton_runs(p, cfgs) -> list:
    """The Triton kernel's configurations as ``(label, fn(x))``."""
    return [(label(cfg), lambda x, cfg=cfg: q4_linear_triton(x, p, None, **cfg)) for cfg in cfgs]


def mma_runs(p, M: int, cfgs) -> list:
    """The mma kernel's configurations as ``(label, fn(x))``, compiled; none where the kernel does not apply (the
    reason printed)."""
    why = cq.unsupported_reason(p)
    if why is not None:
        print(f"  mma kernel not run: {why}", flush=True)
        return []
    default = cq.default_config(M, p, cm._sm_count(p.device))
    full = list(dict.fromkeys(tuple(sorted({**default, **cfg}.items())) for cfg in cfgs))
    keys = {cq.MmaQ4Key(True, cm.octets(M), c["warps"], c["sb"], False, c.get("qst", 0)) for c in map(dict, full)}
    cm.precompile(keys)
    return [("mma " + label(dict(c)) + (" (default)" if dict(c) == default else ""),
             lambda x, c=dict(c): cq.q4_mma_linear(x, p, None, **c)) for c in full]


def check_configs(x, ref, runs) -> dict:
    """Relative error of every configuration's output against ``ref`` (``inf`` for a launch or compilation that
    raised: reported, and the run goes on)."""
    errs = {}
    for name, fn in runs:
        try:
            errs[name] = rel_error(fn(x), ref)
        except Exception as e:  # noqa: BLE001 - one failing configuration must not hide the others
            print(f"  {name}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
            errs[name] = float("inf")
        if not errs[name] < TOL:
            print(f"  {name}: rel err {errs[name]:.1e} >= {TOL:.0e}", flush=True)
    return errs


def time_row(Wd, x, runs, errs, reps: int, rounds: int) -> dict:
    """Cold-L2 times (us) of F.linear on the bf16 weight and of every configuration that passed its check."""
    from tilesparse.kernels import ops

    dev = x.device
    times = {"cublas": 1e3 * ops.time_cold(lambda: torch.nn.functional.linear(x, Wd), dev, reps, rounds)}
    for name, fn in runs:
        if errs[name] < TOL:
            times[name] = 1e3 * ops.time_cold(lambda fn=fn: fn(x), dev, reps, rounds)
    return times


def table_row(shape: str, M: int, p, errs: dict, times: dict | None) -> dict:
    dense_b = p.out_features * p.in_features * 2
    q4_b = p.nbytes()
    bound = dense_b / q4_b
    row = {"row": f"{shape} M={M}", "dense MB": f"{dense_b / 1e6:.1f}", "q4 MB": f"{q4_b / 1e6:.2f}",
           "bytes bound": f"{bound:.2f}x", "max rel err": f"{max(errs.values()):.1e}"}
    ours = {k: v for k, v in (times or {}).items() if k != "cublas"}
    if ours:
        best = min(ours, key=ours.get)
        speed = times["cublas"] / ours[best]
        row["times us"] = {k: round(v, 2) for k, v in times.items()}  # every configuration, in the JSON only
        row.update({"cuBLAS us": f"{times['cublas']:.1f}", "q4 default us": f"{ours.get('default', float('nan')):.1f}",
                    "speed-up": f"{speed:.2f}x", "% of bound": f"{100 * speed / bound:.0f} %",
                    "q4 GB/s": f"{q4_b / ours[best] / 1e3:.0f}"})
        for kind, col, cfg_col in (("triton", "q4 best us", "best config"), ("mma", "mma best us", "mma config")):
            mine = {k: v for k, v in ours.items() if k.startswith("mma") == (kind == "mma")}
            if mine:
                b = min(mine, key=mine.get)
                row.update({col: f"{mine[b]:.1f}", cfg_col: b})
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in, comma separated")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--sparse", default="0,0.45",
                    help="fractions of 2:4 tiles, comma separated (0: the 4-bit dense baseline, same kernels)")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--check", action="store_true", help="check only, no timing (runs under TRITON_INTERPRET=1)")
    ap.add_argument("--default-only", action="store_true", help="only each kernel's default configuration")
    ap.add_argument("--no-mma", action="store_true", help="the Triton kernel only")
    ap.add_argument("--no-triton", action="store_true", help="the mma kernel only")
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
    fracs = [float(f) for f in args.sparse.split(",") if f]
    for shape, frac in [(s, f) for s in args.shapes.split(",") if s for f in fracs]:
        N, K = (int(v) for v in shape.split("x"))
        p, W = packed_layer(N, K, frac, args.group, dev)
        Wd = W.to(torch.bfloat16)
        shape = f"{shape} {100 * frac:.0f} % 2:4"
        for M in tokens:
            n = 1 if args.default_only else None
            runs = [] if args.no_triton else triton_runs(p, CANDIDATES.get(M, [{}])[:n])
            if not args.no_mma:
                runs += mma_runs(p, M, MMA_CANDIDATES.get(M, [{}])[:n])
            x = torch.randn(M, K, device=dev).to(torch.bfloat16)
            ref = x.double() @ W.double().T
            errs = check_configs(x, ref, runs)
            failed += [f"{shape} M={M} {k}: {e:.1e}" for k, e in errs.items() if not e < TOL]
            times = None if args.check else time_row(Wd, x, runs, errs, args.reps, args.rounds)
            rows.append(table_row(shape, M, p, errs, times))
            print(rows[-1], flush=True)
        del p, W, Wd
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (interpreter)"
    head = (f"# 4-bit hybrid decode kernels vs cuBLAS bf16 ({name})\n\n"
            f"Measured {datetime.date.today().isoformat()}, torch {torch.__version__}, triton {triton.__version__}. "
            f"Weights: the row's share of the {TILE[0]}x{TILE[1]} tiles 2:4 (magnitude, at random places), the rest "
            "dense (0 %: the 4-bit dense baseline through the same kernels); "
            f"RTN 4-bit, group {args.group}. Times: cold L2, CUDA graphs, median of {args.rounds} replays of "
            f"{args.reps} launches. Bytes bound = dense bf16 bytes / packed bytes; % of bound = speed-up / bound.\n\n"
            f"Command: `PYTHONPATH=src python3 benchmarks/q4_decode.py {' '.join(sys.argv[1:])}`")
    cols = ["dense MB", "q4 MB", "bytes bound", "max rel err"]
    if not args.check:
        cols += ["cuBLAS us", "q4 default us", "q4 best us", "best config", "mma best us", "mma config", "speed-up",
                 "% of bound", "q4 GB/s"]
    write_table(head, cols, rows, args.out)
    if failed:
        print("FAILED checks (rel err >= %.0e): %s" % (TOL, "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
