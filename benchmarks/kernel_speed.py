"""Layer-level checks and benchmarks of the hybrid kernels (GPU).

    PYTHONPATH=src python3 benchmarks/kernel_speed.py --check            # correctness on the GPU
    PYTHONPATH=src python3 benchmarks/kernel_speed.py --out table.md     # the layer table (CUDA graphs + eager)
    PYTHONPATH=src python3 benchmarks/kernel_speed.py --shapes 4096x4096 --tokens 1,16 --fracs 0.5,1 --verbose
    PYTHONPATH=src python3 benchmarks/kernel_speed.py --decode --precompile 16 --tokens 1,4,16 --fracs 0.5,1 \
        --shapes 4096x4096,11008x4096,4096x11008      # best v6 / v7 / v9 config vs dense (decode cells)
    PYTHONPATH=src python3 benchmarks/kernel_speed.py --check --mma-only   # correctness of the mma kernels only
    PYTHONPATH=src python3 benchmarks/kernel_speed.py --check --gemm-only   # the hybrid GEMM
    ncu --profile-from-start off ... python3 benchmarks/kernel_speed.py --ncu-mma  # v7 profile launches
    ncu --profile-from-start off ... python3 benchmarks/kernel_speed.py --ncu-mma --mma-modes 9  # v9 ones

Timing: every op is timed over ``copies`` distinct weight copies whose dense bytes together exceed
4x the L2 (so no weight is served from L2), inside one CUDA graph (and, separately, eagerly), median
of ``--reps`` replays, divided by the number of copies. Inputs are fresh random data.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time

import torch

from tilesparse.kernels import cuda_mma as _cm
from tilesparse.kernels import format as fmt
from tilesparse.kernels import ops
from tilesparse.kernels.reference import rel_error
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, ZERO, TileGrid

SHAPES = {  # (out, in)
    "4096x4096": (4096, 4096),  # LLaMA-2-7B q/k/v/o
    "11008x4096": (11008, 4096),  # LLaMA-2-7B gate/up
    "4096x11008": (4096, 11008),  # LLaMA-2-7B down
    "14336x4096": (14336, 4096),  # LLaMA-3-8B gate/up
    "4096x14336": (4096, 14336),  # LLaMA-3-8B down
}


def random_kinds(grid: TileGrid, frac_sparse: float, frac_zero: float = 0.0, gen=None) -> torch.Tensor:
    """Tile map with exactly round(frac * tiles) 2:4 (and zero) tiles at random places, the rest dense."""
    n = grid.n_rows * grid.n_cols
    perm = torch.randperm(n, generator=gen)
    kinds = torch.full((n,), DENSE, dtype=torch.int8)
    ns = round(frac_sparse * n)
    nz = round(frac_zero * n)
    kinds[perm[:ns]] = SPARSE
    kinds[perm[ns:ns + nz]] = ZERO
    return kinds.reshape(grid.shape)


def random_packed(N, K, frac, tile=(128, 128), dtype=torch.bfloat16, device="cuda", frac_zero=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = TileGrid(N, K, *tile)
    kinds = random_kinds(grid, frac, frac_zero, g)
    W = (torch.randn(N, K, device=device) * 0.02).to(dtype)
    m24 = topk_mask(torch.rand(N, K, device=device))
    return fmt.pack_from_kinds(W, kinds, m24, tile), W, m24


# ------------------------------------------------------------------ correctness
LAUNCH = {"stream": ops.launch_stream, "mma": ops.launch_mma,
          "gemm": lambda x, p, bias, cfg, out: ops.prepare_gemm(p, cfg, x.shape[0], bias is not None)(x, out, bias)}


def check(args) -> bool:
    dev = "cuda"
    torch.manual_seed(1)
    cases = [  # N, K, tile, frac_sparse, frac_zero
        (4096, 4096, (128, 128), 0.5, 0.0),
        (1000, 576, (128, 128), 0.4, 0.2),  # partial edge tiles both ways
        (576, 1536, (64, 64), 0.6, 0.1),
        (256, 256, (128, 128), 1.0, 0.0),  # all 2:4
        (256, 384, (128, 128), 0.0, 0.0),  # all dense (plain)
        (384, 256, (128, 128), 0.0, 0.5),  # dense + zero
        (200, 96, (16, 16), 0.5, 0.2),
        (130, 200, (32, 64), 0.5, 0.2),
        (128, 128, (128, 128), 0.0, 1.0),  # all zero
        (512, 11008, (128, 128), 0.5, 0.0),  # LLaMA-2-7B down-projection width: 86 tile columns
    ]
    Ms = [1, 2, 5, 16, 33, 64, 65, 200]
    if args.quick:
        cases = [cases[1], cases[3], cases[6], cases[7]]
        Ms = [1, 5, 16, 33, 200]
    only = "stream" if args.stream_only else "mma" if args.mma_only else "gemm" if args.gemm_only else None
    if only in ("stream", "mma"):
        Ms = [1, 3, 5, 16, 33, 64]
    if only == "gemm":  # layers the GEMM takes: a partial last tile-row and tile, all 2:4, a wide down-projection
        Ms = [16, 24, 33, 64]  # the dispatcher's range (ops.candidate_configs)
        cases = [(208, 576, (128, 128), 0.5, 0.1), (256, 256, (128, 128), 1.0, 0.0), (384, 256, (128, 128), 0.0, 0.5),
                 (512, 11008, (128, 128), 0.5, 0.0)]
    ok = True
    n = 0
    worst = 0.0
    t0 = time.time()
    if only == "gemm":  # compile every configuration first, in parallel
        from tilesparse.kernels import cuda_gemm, cuda_mma
        keys = {cuda_gemm.GemmKey(bf16, c.bn, c.bm, c.warps, c.nit, c.ts, b) for M in Ms for c in ops.gemm_candidates(M)
                for bf16 in (True, False) for b in (True, False)}
        print(f"compiled {cuda_mma.precompile(sorted(keys, key=lambda k: k.name), threads=16)} GEMM kernels "
              f"({time.time() - t0:.0f}s)", flush=True)
    for ci, (N, K, tile, fs, fz) in enumerate(cases):
        for dtype in (torch.bfloat16, torch.float16):
            p, W, m24 = random_packed(N, K, fs, tile, dtype, dev, fz, seed=ci)
            Wm = p.unpack()
            if not torch.equal(ops.unpack_triton(p), Wm):
                print(f"FAIL unpack_triton {N}x{K} tile {tile} {dtype}")
                ok = False
            bias = torch.randn(N, device=dev).to(dtype) if ci % 2 == 0 else None
            full = (ci in (0, 9) and dtype == torch.bfloat16 and not args.quick) or only == "gemm"
            for M in Ms:
                x = torch.randn(M, K, device=dev).to(dtype)
                ref = torch.nn.functional.linear(x.double(), Wm.double(), None if bias is None else bias.double())
                cfgs = ops.candidate_configs(M, p, force_kernel=True)
                if only:
                    cfgs = [c for c in cfgs if c.path == only]
                if only == "mma" and args.mma_modes:
                    cfgs = [c for c in cfgs if str(c.mode) in args.mma_modes.split(",")]
                if not full:  # one config per mode and split kind, plus the heuristic
                    keep, seen = [], set()
                    for c in cfgs:
                        sig = (c.path, c.mode, c.split > 1, c.pref)
                        if c.mode == 9 and c.path == "mma":  # v9: every candidate (there are few)
                            sig += (c.warps, c.nit, c.ts)
                        if sig not in seen:
                            seen.add(sig)
                            keep.append(c)
                    cfgs = keep + ([] if only else [ops.heuristic_config(M, p)])
                for cfg in cfgs:
                    # stream / mma / gemm: twice (their counters and workspace must be left reset)
                    for rep in range(2 if cfg.path in LAUNCH else 1):
                        if cfg.path in LAUNCH:
                            out = torch.full((M, N), float("nan"), device=dev, dtype=dtype)
                            launch = LAUNCH[cfg.path]
                            launch(x, p, bias, cfg, out)
                        elif cfg.path == "dense" and not p.is_plain_dense():
                            continue
                        else:
                            out = ops.run_config(x, p, bias, cfg)
                        torch.cuda.synchronize()
                        e = rel_error(out, ref)
                        worst = max(worst, e if math.isfinite(e) else 1e9)
                        n += 1
                        if not e < 1e-2:
                            ok = False
                            print(f"FAIL {N}x{K} tile {tile} fs={fs} fz={fz} {dtype} M={M} bias={bias is not None} "
                                  f"{cfg.short()} (run {rep}): rel err {e:.3e}", flush=True)
            if only:
                continue
            # tuned public path with 3-D and non-contiguous input; first every candidate on that input
            x3 = torch.randn(2, 7, 2 * K, device=dev).to(dtype)[:, :, ::2]
            x3f = x3.reshape(-1, K)
            ref3 = torch.nn.functional.linear(x3f.double(), Wm.double(), None if bias is None else bias.double())
            for cfg in ops.candidate_configs(x3f.shape[0], p, force_kernel=True):
                try:
                    out = ops.run_config(x3f, p, bias, cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print(f"FAIL {N}x{K} tile {tile} {dtype} non-contiguous M=14 {cfg.short()}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                    raise
                e = rel_error(out, ref3)
                n += 1
                if not e < 1e-2:
                    ok = False
                    print(f"FAIL {N}x{K} tile {tile} {dtype} non-contiguous M=14 {cfg.short()}: rel err {e:.3e}")
            y = ops.hybrid_linear(x3, p, bias)
            ref = torch.nn.functional.linear(x3.double(), Wm.double(), None if bias is None else bias.double())
            e = rel_error(y, ref)
            n += 1
            if not e < 1e-2 or y.shape != (2, 7, N):
                ok = False
                print(f"FAIL public 3-D non-contiguous {N}x{K} {dtype}: {e:.3e} {tuple(y.shape)}")
    # bad inputs: clear errors, never wrong output
    p, _, _ = random_packed(256, 256, 0.5, (128, 128), torch.bfloat16, dev)
    for what, fn, exc in [
        ("wrong dtype", lambda: ops.hybrid_linear(torch.randn(3, 256, device=dev), p), TypeError),
        ("wrong K", lambda: ops.hybrid_linear(torch.randn(3, 255, device=dev).bfloat16(), p), ValueError),
        ("cpu input", lambda: ops.hybrid_linear(torch.randn(3, 256).bfloat16(), p), ValueError),
    ]:
        try:
            fn()
            print(f"FAIL bad input '{what}' did not raise")
            ok = False
        except exc:
            pass
    print(f"check: {n} kernel runs, worst rel err {worst:.2e}, {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f}s)")
    return ok


# ------------------------------------------------------------------ timing
def _median_ms(fn_list, graph: bool, reps: int) -> float:
    """Median time of one op (ms), run over every callable of ``fn_list`` in turn."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = None
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fn_list:
                f()
        g.replay()
        torch.cuda.synchronize()
    ts = []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        e0.record()
        if graph:
            g.replay()
        else:
            for f in fn_list:
                f()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    del g
    return statistics.median(ts) / len(fn_list)


def bench(args) -> None:
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    shapes = [s for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    fracs = [float(f) for f in args.fracs.split(",")]
    rows = []
    from torch.sparse import to_sparse_semi_structured

    for sname in shapes:
        N, K = SHAPES[sname] if sname in SHAPES else tuple(int(v) for v in sname.split("x"))
        dense_bytes = N * K * 2
        copies = max(2, math.ceil(4 * l2 / dense_bytes))
        W = [(torch.randn(N, K, device=dev) * 0.02).bfloat16() for _ in range(copies)]
        m24 = topk_mask(torch.rand(N, K, device=dev))
        sp24 = None
        try:
            sp24 = [to_sparse_semi_structured(w * m24) for w in W]
        except Exception as e:  # noqa: BLE001
            print(f"torch 2:4 unavailable: {type(e).__name__}: {str(e)[:100]}")
        for M in tokens:
            x = torch.randn(M, K, device=dev).bfloat16()
            dense_fns = [lambda w=w: torch.nn.functional.linear(x, w) for w in W]
            t_dense_g = _median_ms(dense_fns, True, args.reps)
            t_dense_e = _median_ms(dense_fns, False, args.reps)
            t_sp_g = t_sp_e = float("nan")
            if sp24 is not None:
                try:
                    sp_fns = [lambda w=w: torch.nn.functional.linear(x, w) for w in sp24]
                    t_sp_e = _median_ms(sp_fns, False, args.reps)
                    t_sp_g = _median_ms(sp_fns, True, args.reps)
                except Exception as e:  # noqa: BLE001
                    print(f"torch 2:4 failed at M={M}: {type(e).__name__}: {str(e)[:100]}")
            for f in fracs:
                p0, _, _ = random_packed(N, K, f, (128, 128), torch.bfloat16, dev, seed=int(f * 100))
                ps = [p0] + [p0.clone() for _ in range(copies - 1)]
                best, times = ops.autotune(x, p0, None, verbose=args.verbose, force_kernel=args.verbose)
                key = ops.tune_key(M, p0, False)
                ops._TUNED.update({key: best, key + ("eager",): ops.autotune_eager(x, p0, None, times)})
                if args.verbose:
                    for c, t in sorted(times.items(), key=lambda kv: kv[1]):
                        print(f"    {sname} M={M} f={f:.2f} {c.short():40s} {t * 1e3:8.1f} us")
                # correctness of the tuned path on this shape
                ref = torch.nn.functional.linear(x.double(), p0.unpack().double())
                err = rel_error(ops.hybrid_linear(x, p0), ref)
                hyb_fns = [lambda p=p: ops.hybrid_linear(x, p) for p in ps]
                t_h_g = _median_ms(hyb_fns, True, args.reps)
                t_h_e = _median_ms(hyb_fns, False, args.reps)
                bound = fmt.bytes_bound_speedup(f)
                row = dict(shape=sname, M=M, f=f, dense_g=t_dense_g, hyb_g=t_h_g, dense_e=t_dense_e, hyb_e=t_h_e,
                           sp_g=t_sp_g, sp_e=t_sp_e, bound=bound, cfg=best.short(), err=err,
                           hbytes=p0.nbytes(), dbytes=dense_bytes)
                rows.append(row)
                print(f"{sname:>11} M={M:5d} f={f:.2f} dense {t_dense_g * 1e3:8.1f} us  hybrid {t_h_g * 1e3:8.1f} us "
                      f"x{t_dense_g / t_h_g:5.2f} (bound {bound:.2f}, {t_dense_g / t_h_g / bound * 100:5.1f}%)  "
                      f"eager x{t_dense_e / t_h_e:5.2f}  err {err:.1e}  [{best.short()}]", flush=True)
                write_table(rows, args, props, echo=False)  # so far (a run cut short keeps its rows)
                del ps
            del x
        del W, sp24
        torch.cuda.empty_cache()
    write_table(rows, args, props)


def write_table(rows, args, props, echo: bool = True) -> None:
    lines = [
        f"# Hybrid kernels, layer level ({props.name})",
        "",
        f"Measured {datetime.date.today().isoformat()} on {props.name} ({props.multi_processor_count} SMs), "
        f"torch {torch.__version__}, triton {__import__('triton').__version__}, bf16, random weights and inputs.",
        f"Command: `PYTHONPATH=src python3 benchmarks/kernel_speed.py {' '.join(sys.argv[1:])}`",
        "",
        "Times in microseconds per call, rotating over weight copies > 4x L2; `x dense` = dense time / hybrid time;",
        "`bound` = bytes bound 1/(1-0.4375 f) (the memory-bound ceiling; prefill should be >= 0.97x instead);",
        "`% bound` = speedup / bound; torch 2:4 = `to_sparse_semi_structured` (cuSPARSELt) on a fully 2:4 weight.",
        "",
        "| shape (out x in) | tokens | 2:4 tiles | dense (graph) | hybrid (graph) | x dense | bound | % bound |"
        " dense (eager) | hybrid (eager) | x dense eager | torch 2:4 graph | x torch 2:4 | hybrid/dense bytes | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r["sp_g"]
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['f'] * 100:.0f}% | {r['dense_g'] * 1e3:.1f} | {r['hyb_g'] * 1e3:.1f} | "
            f"{r['dense_g'] / r['hyb_g']:.2f} | {r['bound']:.2f} | {r['dense_g'] / r['hyb_g'] / r['bound'] * 100:.0f}% | "
            f"{r['dense_e'] * 1e3:.1f} | {r['hyb_e'] * 1e3:.1f} | {r['dense_e'] / r['hyb_e']:.2f} | "
            f"{sp * 1e3:.1f} | {sp / r['hyb_g']:.2f} | {r['hbytes'] / r['dbytes']:.3f} | {r['cfg']} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
    if echo:
        print(text)


FAMILIES = (("v6", lambda c: c.path == "stream"), ("v7", lambda c: c.path == "mma" and c.mode == 0),
            ("v9", lambda c: c.path == "mma" and c.mode == 9))


def decode(args) -> None:
    """Per (shape, tokens, 2:4 fraction): every autotuner candidate timed the autotuner's way (cold L2, CUDA
    graphs, ``ops.time_cold``); the best config of each kernel family (v6 ``stream``, v7 / v9 ``mma``) then
    re-timed like the layer table (graph over weight copies > 4x L2, median of ``--reps``), with
    dense ``F.linear``."""
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    rows = []
    t_start = time.time()
    for sname in args.shapes.split(","):
        N, K = SHAPES[sname] if sname in SHAPES else tuple(int(v) for v in sname.split("x"))
        copies = max(2, math.ceil(4 * l2 / (N * K * 2)))
        W = [(torch.randn(N, K, device=dev) * 0.02).bfloat16() for _ in range(copies)]
        for M in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(M, K, device=dev).bfloat16()
            t_dense = _median_ms([lambda w=w: torch.nn.functional.linear(x, w) for w in W], True, args.reps)
            for f in [float(v) for v in args.fracs.split(",")]:
                p0, _, _ = random_packed(N, K, f, (128, 128), torch.bfloat16, dev, seed=int(f * 100))
                ps = [p0] + [p0.clone() for _ in range(copies - 1)]
                ref = torch.nn.functional.linear(x.double(), p0.unpack().double())
                times = {}
                for cfg in ops.candidate_configs(M, p0):
                    if args.paths and cfg.path not in args.paths.split(","):
                        continue
                    try:
                        ops.run_config(x, p0, None, cfg)
                        torch.cuda.synchronize()
                        times[cfg] = ops.time_cold(lambda: ops.run_config(x, p0, None, cfg), x.device)
                    except Exception as e:  # noqa: BLE001
                        print(f"  skip {cfg.short()}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                res = {}
                for tag, sel in FAMILIES:
                    d = {c: t for c, t in times.items() if sel(c)}
                    if not d:
                        continue
                    top = sorted(d.items(), key=lambda kv: kv[1])[:args.top]
                    print(f"  {sname} M={M} f={f} {tag}: " + ", ".join(f"{c.short()} {t * 1e3:.1f}" for c, t in top),
                          flush=True)
                    best = top[0][0]
                    err = rel_error(ops.run_config(x, p0, None, best), ref)
                    if not err < 1e-2:
                        print(f"  WRONG {sname} M={M} f={f} {tag} {best.short()}: rel err {err:.2e}", flush=True)
                    t = _median_ms([lambda p=p: ops.run_config(x, p, None, best) for p in ps], True, args.reps)
                    res[tag] = (best, t, err)
                rows.append((sname, M, f, t_dense, res))
                del ps
            del x
        del W
        torch.cuda.empty_cache()
    lines = [f"decode cells on {props.name} ({time.time() - t_start:.0f}s); us per call, graph, weight copies > 4x L2",
             "| shape | M | f | dense | v6 stream | v7 mma | v9 mma | best x dense | bound "
             "| best % bound | best config | err |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sname, M, f, td, res in rows:
        def t_of(tag):
            return f"{res[tag][1] * 1e3:.1f}" if tag in res else "-"
        b = fmt.bytes_bound_speedup(f)
        cn, tn, _ = min(res.values(), key=lambda v: v[1]) if res else (None, float("nan"), 0.0)
        err = max((e for _, _, e in res.values()), default=float("nan"))
        lines.append(f"| {sname} | {M} | {f:.2f} | {td * 1e3:.1f} | {t_of('v6')} | "
                     f"{t_of('v7')} | {t_of('v9')} | {td / tn:.2f} | {b:.2f} | {td / tn / b * 100:.0f}% | "
                     f"{cn.short() if cn else '-'} | {err:.1e} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


def profile(args) -> None:
    """Launch a few fixed configurations once each (for ``ncu``): 4096x4096, all tiles 2:4, the heuristic's
    stream-kernel configurations at 1 and 16 tokens."""
    dev = "cuda"
    p, W, _ = random_packed(4096, 4096, 1.0, (128, 128), torch.bfloat16, dev)
    for M in (1, 16):
        cfg = ops.heuristic_config(M, p)
        x = torch.randn(M, 4096, device=dev).bfloat16()
        for _ in range(2):
            ops.run_config(x, p, None, cfg)
        torch.nn.functional.linear(x, W)
    torch.cuda.synchronize()
    print("profile launches done")


def ncu_mma_launches(args) -> None:
    """v7 / v9 profile: the sparse-tensor-core kernels and dense ``F.linear`` on 4096x4096 (1 token, all 2:4;
    16 tokens, half 2:4) and 11008x4096 (16 tokens, half 2:4), each once inside cudaProfilerStart/Stop (run
    under ``ncu --profile-from-start off``): a v7 configuration, or with ``--mma-modes`` the configurations of
    those modes (9: v9's candidates)."""
    dev = "cuda"
    T = ops.KernelConfig
    cells = [(4096, 4096, 1, 1.0), (4096, 4096, 16, 0.5), (11008, 4096, 16, 0.5)]
    cfgs = [T("mma", mode=0, bm=16, bn=0, split=8, warps=4, ts=2)]
    if args.mma_modes:  # e.g. "9": only those modes, with v9's candidates
        cfgs = [c for c in cfgs + ops.v9_candidates(16) if str(c.mode) in args.mma_modes.split(",")]
    for N, K, M, f in cells:
        p, W, _ = random_packed(N, K, f, (128, 128), torch.bfloat16, dev, seed=5)
        x = torch.randn(M, K, device=dev).bfloat16()
        fitted = [f for f in (ops._fit(c, p) for c in cfgs) if f is not None]  # (v9: sm_90, fitting stages)
        for c in fitted:
            ops.run_config(x, p, None, c)
        torch.nn.functional.linear(x, W)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for c in fitted:
            ops.run_config(x, p, None, c)
            torch.cuda.synchronize()
            print(f"launched {N}x{K} M={M} f={f} {c.short()}", flush=True)
        torch.nn.functional.linear(x, W)
        torch.cuda.synchronize()
        print(f"launched {N}x{K} M={M} dense", flush=True)
        torch.cuda.cudart().cudaProfilerStop()


def _precompile_worker(job):
    """Compile (by launching once) every ``i % n == w`` stream-kernel candidate config for the token counts
    given."""
    w, n, tokens, dtypes, biases = job
    dev = "cuda"
    done = 0
    for dtype in dtypes:
        p, _, _ = random_packed(256, 256, 0.5, (128, 128), dtype, dev, seed=0)
        for M in tokens:
            x = torch.randn(M, 256, device=dev).to(dtype)
            cfgs = [c for c in ops.candidate_configs(M, p, force_kernel=True) if c.path == "stream"]
            for i, cfg in enumerate(cfgs):
                if i % n != w:
                    continue
                for bias in (None, torch.zeros(256, device=dev, dtype=dtype))[:biases]:
                    try:
                        out = torch.empty(M, 256, device=dev, dtype=dtype)
                        ops.launch_stream(x, p, bias, cfg, out)
                        done += 1
                    except Exception as e:  # noqa: BLE001 - reported, the tuner skips it too
                        print(f"  precompile skip {cfg.short()}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    torch.cuda.synchronize()
    return done


def precompile(tokens: list[int], workers: int, bf16_only: bool = False) -> None:
    """Fill Triton's on-disk kernel cache for every stream-kernel candidate config, ``workers`` processes in
    parallel (compilation is CPU-bound and serial otherwise); timings and checks then start warm. ``bf16_only``:
    bf16 without bias only (what the timing modes run)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.time()
    dts = (torch.bfloat16,) if bf16_only else (torch.bfloat16, torch.float16)
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        n = sum(ex.map(_precompile_worker, [(w, workers, tokens, dts, 1 if bf16_only else 2)
                                            for w in range(workers)]))
    print(f"precompiled {n} launches in {time.time() - t0:.0f}s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run the correctness checks and exit")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,16,64,256,2048,8192")
    ap.add_argument("--fracs", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--quick", action="store_true", help="with --check: fewer cases")
    ap.add_argument("--stream-only", action="store_true", help="with --check: only the v6 stream kernel's configs")
    ap.add_argument("--paths", default="", help="with --decode: only these kernel paths (e.g. stream,mma)")
    ap.add_argument("--mma-only", action="store_true", help="with --check: only the v7 / v9 mma kernels' configs")
    ap.add_argument("--gemm-only", action="store_true", help="with --check: only the hybrid GEMM's configs "
                    "(16-64 tokens)")
    ap.add_argument("--mma-modes", default="", help="with --mma-only / --ncu-mma: only these mma modes (0 = v7, 9)")
    ap.add_argument("--ncu-mma", action="store_true", help="v7 (or --mma-modes) / dense launches to run under ncu")
    ap.add_argument("--profile", action="store_true", help="a few fixed launches to run under ncu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--verbose", action="store_true", help="print every candidate's time")
    ap.add_argument("--top", type=int, default=4, help="with --decode: how many configs of each kernel family to list per cell")
    ap.add_argument("--out", default=None, help="markdown file for the table")
    ap.add_argument("--decode", action="store_true",
                    help="decode comparison: best config of each kernel family vs dense, per cell")
    ap.add_argument("--precompile", type=int, default=0, metavar="WORKERS",
                    help="first compile every candidate config in WORKERS parallel processes")
    ap.add_argument("--precompile-only", action="store_true", help="with --precompile: compile, then exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    if args.precompile:
        if args.check:  # what the check runs: both dtypes, with and without bias
            toks = [1, 3, 5, 16, 33, 64] if args.stream_only else [1, 2, 5, 16, 33, 64, 65, 200]
            precompile(sorted({ops._pow2_at_least(t) for t in toks}), args.precompile)
        if args.decode or not args.check:  # what the timings run: bf16 without bias
            toks = [int(t) for t in args.tokens.split(",")]
            if not args.paths or "stream" in args.paths.split(","):  # (the mma kernels compile in-process, NVRTC)
                precompile(sorted({ops._pow2_at_least(t) for t in toks}), args.precompile, bf16_only=True)
            if not args.paths or "mma" in args.paths.split(","):
                t0 = time.time()
                keys = [k for t in sorted({ops._pow2_at_least(t) for t in toks}) if t <= _cm.MAX_TOKENS
                        for k in ops.mma_keys(t)]
                print(f"precompiled {_cm.precompile(keys, args.precompile)} mma kernels in {time.time() - t0:.0f}s",
                      flush=True)
        if args.precompile_only:
            return 0
    if args.check:
        ok = check(args)
        if not ok or not args.decode:
            return 0 if ok else 1
    if args.decode:
        decode(args)
        return 0
    if args.profile:
        profile(args)
        return 0
    if args.ncu_mma:
        ncu_mma_launches(args)
        return 0
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
