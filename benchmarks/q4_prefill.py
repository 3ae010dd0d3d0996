"""4-bit layers at prefill sizes: ``q4_linear`` above 16 tokens (the weight dequantized on the GPU by
``unpack_q4_kernel``, then ``F.linear``) checked against float64 and timed against cuBLAS on the bf16 weight.

    PYTHONPATH=src python3 benchmarks/q4_prefill.py --out benchmarks/results/q4_prefill_h100.md

Layers as in ``q4_decode.py`` (LLaMA-2-7B shapes, the row's share of 128x128 tiles 2:4, RTN 4-bit). Per shape,
sparsity and token count: the relative error of ``q4_linear(x, p)`` against ``x.double() @ W.double().T`` on the
dequantized weight (fresh random x), then cold-L2 CUDA-graph times (``ops.time_cold``) of the unpack kernel
alone, of the whole ``q4_linear`` call and of ``F.linear`` on the bf16 weight. ``unpack GB/s`` counts the packed
bytes read and the bf16 weight written. The floor of this route is the unpack plus a dense matmul, so its ratio
to cuBLAS stays below 1; it replaces a per-tile-row torch loop (``unpack_q4``).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from _table import write_table
from q4_decode import TOL, packed_layer

from tilesparse.kernels import ops
from tilesparse.kernels.library import q4_linear, q4_unpack_applies
from tilesparse.kernels.reference import rel_error
from tilesparse.kernels.triton_q4 import unpack_q4_triton


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in, comma separated")
    ap.add_argument("--tokens", default="128,2048")
    ap.add_argument("--sparse", default="0,0.45", help="fractions of 2:4 tiles, comma separated")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10, help="launches per CUDA graph")
    ap.add_argument("--rounds", type=int, default=9, help="graph replays (the median is kept)")
    ap.add_argument("--blocks", default="", help="unpack kernel block shapes to time as well, BNxBK comma "
                    "separated (e.g. 64x64,128x128); in the JSON and printed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("q4_prefill needs a CUDA GPU (the kernel's CPU check is tests/kernels/test_kernels_q4_triton.py)")
        return 2
    dev = torch.device("cuda")
    rows, failed = [], []
    for shape in [s for s in args.shapes.split(",") if s]:
        for frac in [float(f) for f in args.sparse.split(",") if f]:
            N, K = (int(v) for v in shape.split("x"))
            p, W = packed_layer(N, K, frac, args.group, dev)
            Wd = W.to(torch.bfloat16)
            w_out = torch.empty(N, K, dtype=torch.bfloat16, device=dev)
            name = f"{shape} {100 * frac:.0f} % 2:4"
            unpack_err = rel_error(unpack_q4_triton(p, w_out), W)
            t_unpack = 1e3 * ops.time_cold(lambda p=p, w=w_out: unpack_q4_triton(p, w), dev, args.reps, args.rounds)
            moved = p.nbytes() + N * K * 2
            sweep = {}
            for blk in [b for b in args.blocks.split(",") if b]:
                bn, bk = (int(v) for v in blk.split("x"))
                e = rel_error(unpack_q4_triton(p, w_out, bn=bn, bk=bk), W)
                if not e < TOL:
                    failed.append(f"{name} unpack {blk}: {e:.1e}")
                    continue
                sweep[blk] = round(1e3 * ops.time_cold(lambda p=p, w=w_out, bn=bn, bk=bk: unpack_q4_triton(p, w, bn=bn,
                                   bk=bk), dev, args.reps, args.rounds), 1)
                print(f"  {name} unpack {blk}: {sweep[blk]} us ({moved / sweep[blk] / 1e3:.0f} GB/s)", flush=True)
            for M in [int(t) for t in args.tokens.split(",") if t]:
                x = torch.randn(M, K, device=dev).to(torch.bfloat16)
                assert q4_unpack_applies(x, p), "q4_linear would not take the unpack route here"
                err = max(unpack_err, rel_error(q4_linear(x, p), x.double() @ W.double().T))
                if not err < TOL:
                    failed.append(f"{name} M={M}: {err:.1e}")
                t_q4 = 1e3 * ops.time_cold(lambda x=x, p=p: q4_linear(x, p), dev, args.reps, args.rounds)
                t_cb = 1e3 * ops.time_cold(lambda x=x, w=Wd: torch.nn.functional.linear(x, w), dev, args.reps, args.rounds)
                rows.append({"row": f"{name} M={M}", "max rel err": f"{err:.1e}", "unpack us": f"{t_unpack:.1f}",
                             "unpack GB/s": f"{moved / t_unpack / 1e3:.0f}", "q4 prefill us": f"{t_q4:.1f}",
                             "cuBLAS bf16 us": f"{t_cb:.1f}", "vs cuBLAS": f"{t_cb / t_q4:.2f}x"})
                if sweep:
                    rows[-1]["unpack us by block"] = sweep  # in the JSON only
                print(rows[-1], flush=True)
    head = (f"# 4-bit layers at prefill sizes vs cuBLAS bf16 ({torch.cuda.get_device_name(dev)})\n\n"
            f"Measured {datetime.date.today().isoformat()}, torch {torch.__version__}, triton {triton.__version__}. "
            f"RTN 4-bit, group {args.group}; cold L2, CUDA graphs, median of {args.rounds} replays of {args.reps} "
            "launches. q4 prefill = unpack_q4_kernel into a scratch bf16 weight + F.linear.\n\n"
            f"Command: `PYTHONPATH=src python3 benchmarks/q4_prefill.py {' '.join(sys.argv[1:])}`")
    write_table(head, ["max rel err", "unpack us", "unpack GB/s", "q4 prefill us", "cuBLAS bf16 us", "vs cuBLAS"],
                rows, args.out)
    if failed:
        print(f"FAILED checks (rel err >= {TOL:.0e}): {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
