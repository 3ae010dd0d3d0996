"""Column-shared hybrid layers on the GPU: the TileLang GEMMs (``kernels.tilelang_columns``, dispatcher path
``"columns"``) checked against float64 and timed against cuBLAS and against the library's other kernels.

    PYTHONPATH=src python3 benchmarks/columns_speed.py --out columns.md
    PYTHONPATH=src python3 benchmarks/columns_speed.py --check-only

A column-shared layer has a share ``f`` of its 128-wide tile-columns 2:4 in every tile-row, the rest dense
(bytes bound ``1 / (1 - 0.4375 f)``), at random places. Per (shape, f, tokens) cell: every candidate of the
columns path, cuBLAS ``F.linear`` on the masked weight, and (``--baseline``) the fastest of the library's other
candidates (decode kernels, the v10 GEMM, unpack + cuBLAS), each timed as the autotuner does (``ops.time_cold``:
CUDA graphs of L2 flush + call, minus flushes alone, median). Checks: every columns candidate against float64 at
every timed cell, plus odd token counts, an all-2:4 layer, an odd count of 2:4 tile-columns and a bias.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from tilesparse.kernels import format as fmt
from tilesparse.kernels import ops
from tilesparse.kernels import tilelang_columns as tc
from tilesparse.kernels.reference import rel_error
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE

SHAPES = {"4096x11008": (4096, 11008), "11008x4096": (11008, 4096), "4096x4096": (4096, 4096)}
TOL = 2e-2


def column_packed(N: int, K: int, f: float, seed: int, n_sp: int | None = None, dtype=torch.bfloat16):
    """A random column-shared layer: ``round(f * C)`` (or ``n_sp``) of its ``C`` tile-columns 2:4, magnitude 2:4
    masks inside them."""
    g = torch.Generator().manual_seed(seed)
    C = K // 128
    n = n_sp if n_sp is not None else round(f * C)
    cols = torch.randperm(C, generator=g)[:n]
    row = torch.full((C,), DENSE, dtype=torch.int8)
    row[cols] = SPARSE
    kinds = row.expand(N // 128, C).contiguous()
    w = (torch.randn(N, K, generator=g) * 0.02).to(dtype).cuda()
    return fmt.pack_from_kinds(w, kinds, topk_mask(w.abs().float()), (128, 128))


def check_cfgs(p, M: int, bias=None) -> list[tuple[str, float]]:
    """Every fitted columns candidate's relative error against float64 at ``M`` tokens."""
    x = torch.randn(M, p.in_features, device="cuda", dtype=p.dtype)
    ref = torch.nn.functional.linear(x.double(), p.unpack().double(), None if bias is None else bias.double())
    out = []
    for c in ops.column_candidates(M):
        f = ops._fit(c, p)
        if f is None:
            continue
        y = ops.run_config(x, p, bias, f)
        torch.cuda.synchronize()
        out.append((f.short(), rel_error(y, ref)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x11008,11008x4096")
    ap.add_argument("--fracs", default="0.9,0.5")
    ap.add_argument("--tokens", default="16,64,256,2048")
    ap.add_argument("--baseline", action="store_true", help="time the library's other candidates too (slow: compiles)")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="checks at 16, 20 and 64 tokens on one layer only")
    ap.add_argument("--budget", type=float, default=480, help="seconds; cells after it are skipped")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    import tilelang

    print(f"device {props.name}, torch {torch.__version__}, TileLang {tilelang.__version__}", flush=True)
    reason = tc.unavailable_reason()
    if reason:
        print(f"TileLang route unavailable: {reason}")
        return 1
    t = time.time()
    toks = ({16, 20, 64} if a.quick else {16, 20, 33, 48, 64, 100, 257, 300}) | {int(v) for v in a.tokens.split(",")}
    n = tc.precompile([k for M in toks for c in ops.column_candidates(M)
                       for k in tc.launch_keys(ops.column_config(c), 128, torch.bfloat16)])
    print(f"precompiled {n} TileLang kernels in {time.time() - t:.0f} s", flush=True)
    # correctness: odd token counts, an all-2:4 layer, an odd count of 2:4 tile-columns, a bias
    bad = 0
    cases = [("f=0.9", column_packed(1024, 2048, 0.9, 1), (16, 20, 64, 100, 300)),
             ("all 2:4", column_packed(1024, 2048, 1.0, 2), (16, 33)),
             ("odd 2:4 count", column_packed(1024, 2048, 0, 3, n_sp=7), (17, 64)),
             ("one 2:4 column", column_packed(512, 1024, 0, 4, n_sp=1), (16, 257))]
    if a.quick:  # the odd count leaves split-K ranges part or wholly past the last step
        cases = [(cases[0][0], cases[0][1], (16, 20, 64)), ("odd 2:4 count", column_packed(1024, 2048, 0, 3, n_sp=9), (17,))]
    for name, p, Ms in cases:
        for M in Ms:
            for cfg, err in check_cfgs(p, M):
                ok = err < TOL
                bad += not ok
                print(f"check {name:15s} M={M:4d} {cfg:45s} err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    p = cases[0][1]
    bias = torch.randn(p.out_features, device="cuda", dtype=p.dtype)
    mb = 20 if a.quick else 48
    for cfg, err in check_cfgs(p, mb, bias):
        bad += err >= TOL
        print(f"check bias            M={mb:4d} {cfg:45s} err {err:.1e} {'ok' if err < TOL else 'FAIL'}", flush=True)
    print(f"checks: {bad} failed, {time.time() - t0:.0f} s", flush=True)
    if a.check_only:
        return 1 if bad else 0
    rows = []
    for sname in a.shapes.split(","):
        N, K = SHAPES[sname]
        for f in (float(v) for v in a.fracs.split(",")):
            p = column_packed(N, K, f, 7)
            fa = p.sparse_fraction()
            bound = fmt.bytes_bound_speedup(fa)
            w = p.unpack().to(p.dtype)
            for M in (int(v) for v in a.tokens.split(",")):
                if time.time() - t0 > a.budget:
                    print(f"budget: {sname} f={f} M={M} skipped", flush=True)
                    continue
                x = torch.randn(M, K, device="cuda", dtype=p.dtype)
                ref = torch.nn.functional.linear(x.double(), w.double())
                t_dense = ops.time_cold(lambda x=x, w=w: torch.nn.functional.linear(x, w), x.device)
                best = None
                for c in ops.column_candidates(M):
                    fc = ops._fit(c, p)
                    if fc is None:
                        continue
                    try:
                        run = ops.prepare_columns(p, fc)
                        err = rel_error(run(x, None), ref)
                        t = ops.time_cold(lambda run=run, x=x: run(x, None), x.device)
                    except Exception as e:  # noqa: BLE001
                        print(f"{sname} f={fa:.2f} M={M} {fc.short()}: {type(e).__name__}: {str(e)[:160]}")
                        continue
                    print(f"{sname} f={fa:.2f} M={M:5d} {fc.short():45s} {t * 1e3:7.1f} us  "
                          f"x{t_dense / t:5.2f} (cuBLAS {t_dense * 1e3:.1f})  err {err:.1e}", flush=True)
                    if err < TOL and (best is None or t < best[1]):
                        best = (fc.short(), t)
                base = None
                if a.baseline:
                    saved = ops.COLUMNS_CANDIDATES
                    ops.COLUMNS_CANDIDATES = False
                    try:
                        cfg, times = ops.autotune(x, p, None)
                        base = (cfg.short(), times[cfg])
                    finally:
                        ops.COLUMNS_CANDIDATES = saved
                    print(f"{sname} f={fa:.2f} M={M:5d} library's other kernels: {base[0]} {base[1] * 1e3:.1f} us "
                          f"x{t_dense / base[1]:.2f}", flush=True)
                rows.append((sname, fa, M, t_dense, best, base, bound))
                del x
            del p, w
            torch.cuda.empty_cache()
    lines = [f"# Column-shared layers, TileLang GEMMs against cuBLAS ({props.name})", "",
             (f"Measured {datetime.date.today().isoformat()} on {props.name}, torch {torch.__version__}, TileLang "
              f"{tilelang.__version__}, bf16; `{' '.join(['benchmarks/columns_speed.py', *sys.argv[1:]])}`. Times: "
              "`ops.time_cold` (CUDA graphs, L2 flushed, median). Ratio = cuBLAS on the masked weight / the kernel; "
              f"% of the bytes bound `1 / (1 - 0.4375 f)`. Correctness checks: {bad} failed."), "",
             ("| shape (out x in) | f | tokens | cuBLAS us | columns path: best | us | ratio | % of bound | "
              "other kernels: best | us | ratio |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for sname, fa, M, td, best, base, bound in rows:
        b = (f"{best[0]} | {best[1] * 1e3:.1f} | {td / best[1]:.2f}x | {100 * td / best[1] / bound:.0f} %"
             if best else "- | - | - | -")
        o = f"{base[0]} | {base[1] * 1e3:.1f} | {td / base[1]:.2f}x" if base else "- | - | -"
        lines.append(f"| {sname} | {fa:.2f} | {M} | {td * 1e3:.1f} | {b} | {o} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
