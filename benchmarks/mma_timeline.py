"""Per-block, per-item timeline of the v9 sparse-tensor-core kernel (GPU, sm_90): where a decode call's time goes.

    PYTHONPATH=src python3 benchmarks/mma_timeline.py                       # the default cells and configs
    PYTHONPATH=src python3 benchmarks/mma_timeline.py --cells 4096x4096:16:0.5 --configs w4p4n2,w4p8n2

The probe build of the kernel (``PROBE=1``) records per block the global timer and the SM clock at entry and
at exit, and per work item when the producer has issued the stage's copies and when consumer warp 0 finds the
stage full and releases it (see :func:`timeline`). Each launch runs on a cold L2 (a large buffer is written
first). Printed per cell and config: the kernel's span by the global timer, when blocks start (launch ramp),
and the median / 90th percentile of each phase in microseconds (SM cycles at the clock the timer pairs give).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import random_packed  # noqa: E402


def _q(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.double(), q))


def _cell(N: int, K: int, M: int, f: float, cfg: ops.KernelConfig):
    """A random packed layer of the cell, the configuration fitted to it (None: does not fit), x and out."""
    p, _, _ = random_packed(N, K, f, (128, 128), torch.bfloat16, "cuda", seed=7)
    x = torch.randn(M, K, device="cuda").bfloat16()
    return p, ops._fit(cfg, p), x, torch.empty(M, N, device="cuda", dtype=torch.bfloat16)


def _probe_runs(run, probe: torch.Tensor, flush: torch.Tensor, reps: int) -> list[torch.Tensor]:
    """``run`` once (compile, warm the instruction cache), then ``reps`` times on a cold L2; the probe's
    contents after each of those."""
    run()
    res = []
    for _ in range(reps):
        flush.add_(1)  # evict the weights from L2
        torch.cuda.synchronize()
        run()
        torch.cuda.synchronize()
        res.append(probe.cpu())
    return res


def _rel_err(x: torch.Tensor, p, out: torch.Tensor) -> float:
    ref = torch.nn.functional.linear(x.double(), p.unpack().double())
    return float((out.double() - ref).norm() / ref.norm())


def _cfg(spec: str, M: int) -> ops.KernelConfig:
    m = re.fullmatch(r"w(\d+)p(\d+)n(\d+)", spec)
    if not m:
        raise SystemExit(f"config '{spec}': expected w<consumer warps>p<steps per item>n<stages>")
    w, spb, nst = (int(v) for v in m.groups())
    return ops.KernelConfig("mma", mode=9, bm=8 * cm.octets(M), bn=0, split=1, warps=w, ts=nst, nit=spb)


def timeline(N: int, K: int, M: int, f: float, spec: str, flush: torch.Tensor, reps: int) -> str:
    """Per item, the copy latency (producer's x copies issued -> stage full at consumer warp 0), the
    consumers' wait for data (previous release -> full), their MMA time (full -> release) and the producer's
    wait for a free stage (release of item k - stages -> issue of item k)."""
    p, cfg, x, out = _cell(N, K, M, f, _cfg(spec, M))
    if cfg is None:
        return f"| {N}x{K} | {M} | {f:.2f} | {spec}: does not fit |"
    _, blocks, ranges = cm.v9_plan(p, cfg.nit, cfg.warps, cm.octets(M), cfg.ts)
    W = 4 + 3 * cm.V9_MAX_ITEMS
    probe = torch.zeros(blocks, W, device="cuda", dtype=torch.int64)
    ws = torch.zeros(M * N, device="cuda", dtype=torch.float32)
    cnt = torch.zeros(p.grid.n_rows * (p.tile_rows // cfg.bn), device="cuda", dtype=torch.int32)

    def run():
        cm.launch(x, p, None, out, cfg.warps, cfg.split, cfg.ts, ws, cnt, 9, cfg.nit, probe)

    n_it = (ranges[1:] - ranges[:-1]).cpu()
    spans, stats = [], []
    for pr in _probe_runs(run, probe, flush, reps):
        g0, c0, c1, g1 = pr[:, 0], pr[:, 1], pr[:, 2], pr[:, 3]
        cyc_us = float(((c1 - c0).double().sum() / (g1 - g0).double().sum()).clamp(min=0.5)) * 1e3
        lat, mma, wait, pstall, first, tail = [], [], [], [], [], []
        for b in range(blocks):
            n = int(n_it[b])
            if n == 0:
                continue
            ev = pr[b, 4:4 + 3 * n].view(n, 3).double()
            iss, full, rel = ev[:, 0], ev[:, 1], ev[:, 2]
            lat.append((full - iss) / cyc_us)
            mma.append((rel - full) / cyc_us)
            wait.append((full[1:] - rel[:-1]) / cyc_us)
            if n > cfg.ts:
                pstall.append((iss[cfg.ts:] - rel[:-cfg.ts]) / cyc_us)
            first.append(float(full[0] - c0[b]) / cyc_us)
            tail.append(float(c1[b] - rel[-1]) / cyc_us)
        cat = [torch.cat(v) if v else torch.zeros(1) for v in (lat, mma, wait, pstall)]
        stats.append((cat, torch.tensor(first), torch.tensor(tail), (g0 - g0.min()) / 1e3, cyc_us / 1e3))
        spans.append(float(g1.max() - g0.min()) / 1e3)
    med = sorted(range(reps), key=lambda i: spans[i])[reps // 2]
    (lat, mma, wait, pstall), first, tail, start, ghz = stats[med]
    err = _rel_err(x, p, out)
    mq = lambda t: f"{_q(t, 0.5):.2f} / {_q(t, 0.9):.2f}"  # noqa: E731
    return (f"| {N}x{K} | {M} | {f:.2f} | {cfg.short()} | {blocks} | {float(n_it.float().mean()):.1f} | "
            f"{spans[med]:.1f} | {_q(start, 0.5):.1f} / {_q(start, 1.0):.1f} | {mq(first)} | {mq(lat)} | {mq(wait)} | "
            f"{mq(mma)} | {mq(pstall)} | {mq(tail)} | {ghz:.2f} | {err:.1e} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="4096x4096:1:1,4096x4096:16:0.5,11008x4096:16:0.5",
                    help="comma-separated NxK:tokens:2:4-fraction")
    ap.add_argument("--configs", "--v9", default="w4p2n5,w4p4n2,w8p2n2",
                    help="comma-separated w<consumer warps>p<steps per item>n<stages>")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    if not cm.v9_available():
        print("needs a CUDA GPU of compute capability 9.0+")
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    flush = torch.zeros(2 * l2 // 4, device="cuda", dtype=torch.float32)
    title = (f"v9 per-item timeline on {torch.cuda.get_device_name()} (us; producer lane 0 and consumer thread 0 "
             f"of each block; median run of {args.reps}, cold L2); med / p90 over items or blocks")
    cols = ["shape", "M", "f", "config", "blocks", "items per block", "span", "block start med / max",
            "first item full", "copy latency", "consumer wait", "MMA per item", "producer wait", "tail", "GHz", "err"]
    print(title)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for cell in args.cells.split(","):
        shape, M, f = cell.split(":")
        N, K = (int(v) for v in shape.split("x"))
        for spec in args.configs.split(","):
            print(timeline(N, K, int(M), float(f), spec, flush, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
