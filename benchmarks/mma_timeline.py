"""Per-block timeline of the v8 sparse-tensor-core kernel (GPU): where a decode call's time goes.

    PYTHONPATH=src python3 benchmarks/mma_timeline.py                       # the default cells
    PYTHONPATH=src python3 benchmarks/mma_timeline.py --cells 4096x4096:16:0.5 --configs w4sb2p8,w4sb2p8pf

The probe build of the kernel (``PROBE=1``) has thread 0 of every block record the global timer and the SM
clock at entry, after its x is staged (block barrier), after its last MMA, and at exit (after the split-K
reduction). Each launch runs on a cold L2 (a large buffer is written first). Printed per cell and config:
the kernel's span by the global timer, when blocks start (launch ramp) and end, and the median / 90th
percentile of each phase in microseconds (SM cycles at the clock the timer pairs give).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernels import random_packed  # noqa: E402


def _cfg(spec: str, M: int) -> ops.KernelConfig:
    m = re.fullmatch(r"w(\d+)sb(\d+)p(\d+)(pf)?", spec)
    if not m:
        raise SystemExit(f"config '{spec}': expected w<warps>sb<steps per batch>p<steps per block>[pf]")
    w, sb, spb = (int(v) for v in m.groups()[:3])
    return ops.KernelConfig("mma", 8, 8 * cm.octets(M), 0, 0, 1, w, 1, True, 0, 0, sb, spb, pref=int(bool(m[4])))


def _q(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.double(), q))


def timeline(N: int, K: int, M: int, f: float, spec: str, flush: torch.Tensor, reps: int) -> str:
    p, _, _ = random_packed(N, K, f, (128, 128), torch.bfloat16, "cuda", seed=7)
    cfg = ops._fit(_cfg(spec, M), p)
    if cfg is None:
        return f"{N}x{K} M={M} f={f} {spec}: does not fit"
    x = torch.randn(M, K, device="cuda").bfloat16()
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    cpt = p.tile_rows // cfg.bn
    n_blocks = p.grid.n_rows * cpt * cfg.split
    ws = torch.zeros(M * N, device="cuda", dtype=torch.float32)
    cnt = torch.zeros(p.grid.n_rows * cpt, device="cuda", dtype=torch.int32)
    probe = torch.zeros(n_blocks, 8, device="cuda", dtype=torch.int64)

    def run():
        cm.launch(x, p, None, out, cfg.warps, cfg.split, cfg.ts, ws, cnt, 8, cfg.nit, probe, bool(cfg.pref))

    run()  # compile, warm the instruction cache
    spans, rows = [], []
    for _ in range(reps):
        flush.add_(1)  # evict the weights from L2
        torch.cuda.synchronize()
        run()
        torch.cuda.synchronize()
        pr = probe.cpu()
        live = pr[:, 5] > 0
        pr = pr[live]
        g0, c0, c1, c2, c3, g1 = (pr[:, i] for i in range(6))
        ghz = float(((c3 - c0).double().sum() / (g1 - g0).double().sum()).clamp(min=0.5))
        t0 = g0.min()
        rows.append(((g0 - t0) / 1e3, (g1 - t0) / 1e3, (c1 - c0) / ghz / 1e3, (c2 - c1) / ghz / 1e3,
                     (c3 - c2) / ghz / 1e3, ghz))
        spans.append(float(g1.max() - t0) / 1e3)
    med = sorted(range(reps), key=lambda i: spans[i])[reps // 2]  # the run with the median span
    start, end, stage, loop, tail, ghz = rows[med]
    ref = torch.nn.functional.linear(x.double(), p.unpack().double())
    err = float((out.double() - ref).norm() / ref.norm())
    return (f"| {N}x{K} | {M} | {f:.2f} | {cfg.short()} | {n_blocks} | {spans[med]:.1f} | "
            f"{_q(start, 0.5):.1f} / {_q(start, 1.0):.1f} | {_q(end, 0.5):.1f} | "
            f"{_q(stage, 0.5):.2f} / {_q(stage, 0.9):.2f} | {_q(loop, 0.5):.2f} / {_q(loop, 0.9):.2f} | "
            f"{_q(tail, 0.5):.2f} / {_q(tail, 0.9):.2f} | {ghz:.2f} | {err:.1e} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="4096x4096:1:1,4096x4096:16:0.5,11008x4096:16:0.5",
                    help="comma-separated NxK:tokens:2:4-fraction")
    ap.add_argument("--configs", default="w4sb2p8,w4sb2p8pf,w8sb2p16pf,w4sb4p4,w4sb4p4pf")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    if not cm.available():
        print("needs a CUDA GPU of compute capability 8.0+")
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    flush = torch.zeros(2 * l2 // 4, device="cuda", dtype=torch.float32)
    print(f"v8 per-block timeline on {torch.cuda.get_device_name()} (us; thread 0 of each block; median run of "
          f"{args.reps}, cold L2)")
    print("| shape | M | f | config | blocks | span | block start med / max | block end med | x staged "
          "med / p90 | MMA loop med / p90 | tail med / p90 | GHz | err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in args.cells.split(","):
        shape, M, f = cell.split(":")
        N, K = (int(v) for v in shape.split("x"))
        for spec in args.configs.split(","):
            print(timeline(N, K, int(M), float(f), spec, flush, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
