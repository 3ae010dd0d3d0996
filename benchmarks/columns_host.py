"""What an eager call of a column-shared layer costs the host: each step of the call path, timed while the GPU is
kept busy (so that only the host's time counts), against ``F.linear`` on the dense weight.

    PYTHONPATH=src:benchmarks python3 benchmarks/columns_host.py [--shape 4096x11008] [--tokens 16]

Rows: the dense layer (``F.linear``, ``nn.Linear``); the hybrid module's eager forward (the dispatcher's cached
launch after tuning among the TileLang candidates); the prepared launch alone; the layer's one TileLang program (both kernels) against the two
programs called one after the other; pieces of the path (an output allocation, the stream checks). Each row:
median over rounds of ``--calls`` back-to-back calls queued behind a GPU sleep (``torch.cuda._sleep``), in us
per call. The program and the two programs are first checked against float64 and timed on the GPU (CUDA graphs,
``ops.time_cold``): one program must cost the GPU what the two cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from columns_speed import TOL, column_packed

from tilesparse.kernels import ops
from tilesparse.kernels import tilelang_columns as tc
from tilesparse.kernels.linear import HybridLinear
from tilesparse.kernels.reference import rel_error


def host_us(fn, calls: int, rounds: int = 7) -> float:
    """Host microseconds per call of ``fn`` queued behind a GPU sleep long enough to outlast the calls."""
    per = ops.host_time(fn, reps=10) * 1e-3  # seconds per call when the GPU may pace them
    cycles = int(max(per * calls * 3, 2e-3) * 2e9)  # at up to 2 GHz: at least three times the calls' host time
    out = []
    for _ in range(rounds):
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x11008", help="out x in")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dense-cols", type=int, default=6)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    N, K = (int(v) for v in a.shape.split("x"))
    M = a.tokens
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; {N}x{K}, {M} tokens")
    p = column_packed(N, K, 0, 7, n_sp=K // 128 - a.dense_cols)
    lay = tc.column_layout(p)
    w = p.unpack().to(p.dtype)
    x = torch.randn(M, K, device="cuda", dtype=p.dtype)
    ref = x.double() @ w.double().T
    rows, bad = [], 0

    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=p.dtype)
    rows.append(("F.linear (cuBLAS, dense weight)", host_us(lambda: torch.nn.functional.linear(x, w), a.calls)))
    rows.append(("nn.Linear module", host_us(lambda: lin(x), a.calls)))

    ops.MMA_CANDIDATES = ops.STREAM_CANDIDATES = ops.GEMM_CANDIDATES = False  # tune among the TileLang ones only
    mod = HybridLinear(p)
    y = mod(x)  # tunes this layer for M tokens (the eager choice) and caches the launch
    torch.cuda.synchronize()
    err = rel_error(y, ref)
    bad += err >= TOL
    eager_cfg = ops._TUNED.get(ops.tune_key(M, p, False) + ("eager",))
    rows.append((f"HybridLinear eager forward ({eager_cfg.short() if eager_cfg else '?'}; err {err:.1e})",
                 host_us(lambda: mod(x), a.calls)))
    rows.append(("hybrid_linear(x, packed)", host_us(lambda: ops.hybrid_linear(x, p), a.calls)))

    out = torch.empty(M, N, device="cuda", dtype=p.dtype)
    print("| configuration | error: one program / two programs | GPU us: one program | two programs |")
    print("|---|---|---|---|")
    for z, d in ((1, False), (2, False), (1, True)):
        cfg = tc.ColumnConfig(M if M in (16, 32, 64) else 16, 64, 1, 6, 128, False, False, splits=z, pdl=d)
        run = tc.prepare(lay, cfg, p.dtype)
        (_, sp_p), (_, dn_p) = tc.kernel_params(cfg, 128, p.dtype)
        sp, dn = tc.kernel("sparse", sp_p), tc.kernel("dense", dn_p)
        part = torch.empty(z, M, N, device="cuda", dtype=torch.float32)

        def two(sp=sp, dn=dn, z=z, part=part):
            if z == 1:
                sp(lay.ws, lay.e16, lay.sp_tc, x, out)
                dn(lay.wd, lay.dn_tc, x, out)
            else:
                sp(lay.ws, lay.e16, lay.sp_tc, x, part)
                dn(lay.wd, lay.dn_tc, x, part, out)

        chk = torch.full_like(out, float("nan"))
        run(x, chk)
        torch.cuda.synchronize()
        e1 = rel_error(chk, ref)
        out.fill_(float("nan"))  # the two programs write into out
        two()
        torch.cuda.synchronize()
        e2 = rel_error(out, ref)
        bad += e1 >= TOL or e2 >= TOL
        g1 = ops.time_cold(lambda run=run: run(x, out), x.device)
        g2 = ops.time_cold(two, x.device)
        tag = f"splits {z}{' pdl' if d else ''}"
        print(f"| {tag} | {e1:.1e} / {e2:.1e} | {g1 * 1e3:.1f} | {g2 * 1e3:.1f} |", flush=True)
        rows.append((f"prepared launch, one program ({tag})", host_us(lambda run=run: run(x, out), a.calls)))
        rows.append((f"two programs ({tag})", host_us(two, a.calls)))
        if z == 1 and not d:
            prog = tc.kernel(*tc.launch_keys(cfg, 128, p.dtype)[0])
            exe = getattr(prog.adapter, "get_exportable_executable", None)
            if exe is not None:  # the TVM-FFI function itself, without TileLang's Python wrapper
                exe = exe()
                chk.fill_(float("nan"))
                exe(lay.ws, lay.e16, lay.sp_tc, lay.wd, lay.dn_tc, x, chk)
                torch.cuda.synchronize()
                err = rel_error(chk, ref)
                bad += err >= TOL
                rows.append((f"one program, its TVM-FFI executable called directly (err {err:.1e})",
                             host_us(lambda exe=exe: exe(lay.ws, lay.e16, lay.sp_tc, lay.wd, lay.dn_tc, x, out),
                                     a.calls)))
            rows.append(("the 2:4 program alone", host_us(lambda sp=sp: sp(lay.ws, lay.e16, lay.sp_tc, x, out),
                                                          a.calls)))
            rows.append(("the dense program alone", host_us(lambda dn=dn: dn(lay.wd, lay.dn_tc, x, out), a.calls)))
    rows.append(("torch.empty(M, N)", host_us(lambda: torch.empty(M, N, device="cuda", dtype=p.dtype), a.calls)))
    rows.append(("torch.cuda.current_device() + is_current_stream_capturing()",
                 host_us(lambda: (torch.cuda.current_device(), torch.cuda.is_current_stream_capturing()), a.calls)))
    print()
    print("| host cost per call | us |")
    print("|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    print(f"checks: {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
