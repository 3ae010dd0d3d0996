#!/usr/bin/env python3
"""Hybrid-GEMM route spike, tuning pass: does a tuned TileLang ``T.gemm_sp`` reach the go numbers that
spike.py's default tiles miss (results: ``benchmarks/results/gemm_route_h200.md``)?

Times a grid of tile shapes, stages, warp policy, block rasterization and pipelining style (cp.async or
warp-specialized TMA) for the all-2:4 kernel at 16 / 64 / 2048 tokens, cuSPARSELt's kernel inside a CUDA graph
(its per-call setup excluded), a hybrid kernel in 64-column steps at 16 / 64 / 2048 tokens (checkerboard tile map, rectangular arrays), and the
same over a tile-major layout with a random 45 % tile map (per-tile-row loop lengths; every weight copy a TMA
copy): the layout a packed format would need for this route.

Env: SWEEP_BUDGET_S (default 240). Output: one line per kernel, then per case the best config.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spike as S  # noqa: E402

S.BUDGET = float(os.environ.get("SWEEP_BUDGET_S", "240"))
S.Bench.prof_ok = False
log, one_line = S.log, S.one_line
TILE = 128
TM_FRAC = 0.45  # 2:4 tiles of the tile-major hybrid (the 45 % sparsity of a model)


def sp_func(N, K, M, bm, bn, bk, stages, threads, dt, swz, policy, x_cols=None, store="ct"):
    """All-2:4 ``T.gemm_sp``: A [N, K] 2:4 (values, TileLang metadata) times the first K columns of X [M, x_cols]
    (``x_cols``: K by default; wider when x is read in place); ``store`` "ct": C = y^T [N, M], "y": y [M, N] by a
    transposed store of the accumulator."""
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    pol = {"sq": P.Square, "row": P.FullRow, "col": P.FullCol}[policy]
    nk = K // bk
    cshape = (M, N) if store == "y" else (N, M)

    @T.prim_func
    def main(Ws: T.Tensor((N, K // 2), dt), E: T.Tensor((N, K // 16), "int16"), X: T.Tensor((M, x_cols or K), dt),
             C: T.Tensor(cshape, dt)):
        with T.Kernel(T.ceildiv(M, bn), T.ceildiv(N, bm), threads=threads) as (bx, by):
            A_s = T.alloc_shared((bm, bk // 2), dt)
            E_s = T.alloc_shared((bm, bk // 16), "int16")
            B_s = T.alloc_shared((bn, bk), dt)
            C_l = T.alloc_fragment((bm, bn), "float32")
            T.use_swizzle(panel_size=swz, enable=swz > 0)
            T.clear(C_l)
            for k in T.Pipelined(nk, num_stages=stages):
                T.copy(Ws[by * bm, k * bk // 2], A_s)
                T.copy(E[by * bm, k * bk // 16], E_s)
                T.copy(X[bx * bn, k * bk], B_s)
                T.gemm_sp(A_s, E_s, B_s, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
            if store == "y":
                for i, j in T.Parallel(bm, bn):
                    C[bx * bn + j, by * bm + i] = C_l[i, j]
            else:
                T.copy(C_l, C[by * bm, bx * bn])

    return main


def dense_func(N, K, M, bm, bn, bk, stages, threads, dt, swz, policy):
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    pol = {"sq": P.Square, "row": P.FullRow, "col": P.FullCol}[policy]

    @T.prim_func
    def main(W: T.Tensor((N, K), dt), X: T.Tensor((M, K), dt), C: T.Tensor((N, M), dt)):
        with T.Kernel(T.ceildiv(M, bn), T.ceildiv(N, bm), threads=threads) as (bx, by):
            A_s = T.alloc_shared((bm, bk), dt)
            B_s = T.alloc_shared((bn, bk), dt)
            C_l = T.alloc_fragment((bm, bn), "float32")
            T.use_swizzle(panel_size=swz, enable=swz > 0)
            T.clear(C_l)
            for k in T.Pipelined(K // bk, num_stages=stages):
                T.copy(W[by * bm, k * bk], A_s)
                T.copy(X[bx * bn, k * bk], B_s)
                T.gemm(A_s, B_s, C_l, transpose_A=False, transpose_B=True, policy=pol)
            T.copy(C_l, C[by * bm, bx * bn])

    return main


def hyb_func(N, K, M, nsp, ndn, bm, bn, stages, threads, dt, swz, policy):
    """Hybrid in 64-column steps: the tile-row's 2:4 steps (2 per 2:4 tile), then its dense steps (2 per dense
    tile), one fp32 accumulator; x columns gathered by tile index."""
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    pol = {"sq": P.Square, "row": P.FullRow, "col": P.FullCol}[policy]
    R = N // TILE
    bk = 64
    assert TILE % bm == 0 or bm % TILE == 0

    @T.prim_func
    def main(SPV: T.Tensor((N, nsp * TILE // 2), dt), SPE: T.Tensor((N, nsp * TILE // 16), "int16"),
             SPC: T.Tensor((R, nsp), "int32"), DNV: T.Tensor((N, ndn * TILE), dt), DNC: T.Tensor((R, ndn), "int32"),
             X: T.Tensor((M, K), dt), C: T.Tensor((N, M), dt)):
        with T.Kernel(T.ceildiv(M, bn), T.ceildiv(N, bm), threads=threads) as (bx, by):
            A_s = T.alloc_shared((bm, bk // 2), dt)
            E_s = T.alloc_shared((bm, bk // 16), "int16")
            B_s = T.alloc_shared((bn, bk), dt)
            D_s = T.alloc_shared((bm, bk), dt)
            B2_s = T.alloc_shared((bn, bk), dt)
            C_l = T.alloc_fragment((bm, bn), "float32")
            T.use_swizzle(panel_size=swz, enable=swz > 0)
            r = (by * bm) // TILE
            T.clear(C_l)
            for k in T.Pipelined(nsp * 2, num_stages=stages):
                T.copy(SPV[by * bm, k * (bk // 2)], A_s)
                T.copy(SPE[by * bm, k * (bk // 16)], E_s)
                T.copy(X[bx * bn, SPC[r, k // 2] * TILE + (k % 2) * bk], B_s)
                T.gemm_sp(A_s, E_s, B_s, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
            for k in T.Pipelined(ndn * 2, num_stages=stages):
                T.copy(DNV[by * bm, k * bk], D_s)
                T.copy(X[bx * bn, DNC[r, k // 2] * TILE + (k % 2) * bk], B2_s)
                T.gemm(D_s, B2_s, C_l, transpose_A=False, transpose_B=True, policy=pol)
            T.copy(C_l, C[by * bm, bx * bn])

    return main


def hybtm_func(N, K, M, nspt, ndnt, bm, bn, stages, threads, dt, swz, policy):
    """Hybrid over a tile-major layout (a candidate packed format): 2:4 tiles' values [n_sparse, TILE, TILE/2]
    and metadata [n_sparse, TILE, TILE/16] (int16), dense tiles [n_dense, TILE, TILE], per tile-row CSR
    pointers and tile columns; each tile-row's own tile counts set its loop lengths (a real tile map, not a
    checkerboard). Static strides, so every weight copy can be a TMA copy."""
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    pol = {"sq": P.Square, "row": P.FullRow, "col": P.FullCol}[policy]
    R = N // TILE
    bk = 64
    assert TILE % bm == 0

    @T.prim_func
    def main(SPV: T.Tensor((nspt, TILE, TILE // 2), dt), SPE: T.Tensor((nspt, TILE, TILE // 16), "int16"),
             SPP: T.Tensor((R + 1,), "int32"), SPC: T.Tensor((nspt,), "int32"),
             DNV: T.Tensor((ndnt, TILE, TILE), dt), DNP: T.Tensor((R + 1,), "int32"), DNC: T.Tensor((ndnt,), "int32"),
             X: T.Tensor((M, K), dt), C: T.Tensor((N, M), dt)):
        with T.Kernel(T.ceildiv(M, bn), T.ceildiv(N, bm), threads=threads) as (bx, by):
            A_s = T.alloc_shared((bm, bk // 2), dt)
            E_s = T.alloc_shared((bm, bk // 16), "int16")
            B_s = T.alloc_shared((bn, bk), dt)
            D_s = T.alloc_shared((bm, bk), dt)
            B2_s = T.alloc_shared((bn, bk), dt)
            C_l = T.alloc_fragment((bm, bn), "float32")
            T.use_swizzle(panel_size=swz, enable=swz > 0)
            r = (by * bm) // TILE
            r0 = (by * bm) % TILE
            sp0 = SPP[r]
            nsp = SPP[r + 1] - sp0
            dn0 = DNP[r]
            ndn = DNP[r + 1] - dn0
            T.clear(C_l)
            for k in T.Pipelined(nsp * 2, num_stages=stages):
                T.copy(SPV[sp0 + k // 2, r0:r0 + bm, (k % 2) * (bk // 2):(k % 2) * (bk // 2) + bk // 2], A_s)
                T.copy(SPE[sp0 + k // 2, r0:r0 + bm, (k % 2) * (bk // 16):(k % 2) * (bk // 16) + bk // 16], E_s)
                T.copy(X[bx * bn, SPC[sp0 + k // 2] * TILE + (k % 2) * bk], B_s)
                T.gemm_sp(A_s, E_s, B_s, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
            for k in T.Pipelined(ndn * 2, num_stages=stages):
                T.copy(DNV[dn0 + k // 2, r0:r0 + bm, (k % 2) * bk:(k % 2) * bk + bk], D_s)
                T.copy(X[bx * bn, DNC[dn0 + k // 2] * TILE + (k % 2) * bk], B2_s)
                T.gemm(D_s, B2_s, C_l, transpose_A=False, transpose_B=True, policy=pol)
            T.copy(C_l, C[by * bm, bx * bn])

    return main


def random_tile_map(N, K, frac_sparse, dt, device, gen, seed=7):
    """A random hybrid weight: ``frac_sparse`` of the 128x128 tiles 2:4 at random places (``seed``), random 2:4
    patterns, the rest dense. Returns the masked weight ``w``, the tile map ``is_sp`` [R, C] (CPU), and ``w``'s
    tiles and its 2:4 keep-mask's, both ``[R, C, TILE, TILE]``."""
    R, Cn = N // TILE, K // TILE
    w24, m24 = S.random_24(N, K, dt, device, gen)
    wd = torch.randn(N, K, generator=gen, device=device, dtype=torch.float32).to(dt)
    order = torch.randperm(R * Cn, generator=torch.Generator().manual_seed(seed))
    is_sp = torch.zeros(R * Cn, dtype=torch.bool)
    is_sp[order[:round(frac_sparse * R * Cn)]] = True
    is_sp = is_sp.reshape(R, Cn)
    full = is_sp.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1).to(device)
    w = torch.where(full, w24, wd)
    tiles = w.reshape(R, TILE, Cn, TILE).permute(0, 2, 1, 3)
    mtiles = m24.reshape(R, TILE, Cn, TILE).permute(0, 2, 1, 3)  # (not w != 0: a kept value can be 0)
    return w, is_sp, tiles, mtiles


def tile_major_hybrid(N, K, frac_sparse, dt, device, gen):
    """:func:`random_tile_map`'s weight in the tile-major layout of :func:`hybtm_func`, and the masked dense
    weight."""
    R = N // TILE
    w, is_sp, tiles, mtiles = random_tile_map(N, K, frac_sparse, dt, device, gen)
    sp_t = tiles[is_sp.to(device)].contiguous()  # row-major order of (r, c): tile-rows in order
    dn_t = tiles[~is_sp.to(device)].contiguous()
    mask = mtiles[is_sp.to(device)]
    vals, meta = S.pack24(sp_t.reshape(-1, TILE), mask.reshape(-1, TILE))
    rows, cols = torch.nonzero(is_sp, as_tuple=True)
    drows, dcols = torch.nonzero(~is_sp, as_tuple=True)
    spp = torch.zeros(R + 1, dtype=torch.int32)
    spp[1:] = torch.bincount(rows, minlength=R).cumsum(0)
    dnp = torch.zeros(R + 1, dtype=torch.int32)
    dnp[1:] = torch.bincount(drows, minlength=R).cumsum(0)
    n_sp = sp_t.shape[0]
    return dict(w=w, SPV=vals.reshape(n_sp, TILE, TILE // 2), SPE=S.meta_for_tilelang(meta).reshape(n_sp, TILE, TILE // 16),
                SPP=spp.to(device), SPC=cols.to(torch.int32).to(device), DNV=dn_t, DNP=dnp.to(device),
                DNC=dcols.to(torch.int32).to(device), n_sp=n_sp, n_dn=dn_t.shape[0])


def tm_counts(N, K, frac_sparse):
    n = (N // TILE) * (K // TILE)
    k = round(frac_sparse * n)
    return k, n - k


def smem_sp(bm, bn, bk, stages):
    return stages * (bm * bk + bm * bk // 8 + bn * bk * 2)


def configs():
    """[(kind, N, K, M, cfg)]; cfg = (bm, bn, bk, stages, threads, swz, policy, pc)."""
    out = []
    for (N, K) in S.SHAPES:
        # 2048 tokens: compute-bound tiles
        for bm, bn, bk, st, th in ((128, 256, 64, 3, 256), (128, 256, 64, 4, 256), (128, 256, 128, 2, 256),
                                   (128, 128, 128, 3, 256), (128, 128, 64, 4, 128), (256, 128, 64, 3, 256),
                                   (128, 256, 64, 3, 128), (256, 128, 128, 2, 256)):
            if smem_sp(bm, bn, bk, st) > 220 * 1024:
                continue
            for pc in ("ws", "nows"):
                for swz in (0, 8):
                    out.append(("sp", N, K, 2048, (bm, bn, bk, st, th, swz, "sq", pc)))
        for bm, bn, bk, st, th in ((128, 256, 64, 3, 256), (128, 256, 64, 4, 256)):
            out.append(("dense", N, K, 2048, (bm, bn, bk, st, th, 8, "sq", "ws")))
        for bm, bn, st, th in ((128, 256, 3, 256), (128, 128, 4, 256), (64, 256, 3, 128), (128, 256, 2, 256)):
            for pc in ("ws", "nows"):
                out.append(("hyb", N, K, 2048, (bm, bn, 64, st, th, 8, "sq", pc)))
        # few tokens: weight-read bound
        for M in (16, 64):
            for bm, bk, st, th, pol in ((64, 128, 4, 128, "row"), (64, 256, 4, 128, "row"), (64, 128, 6, 128, "row"),
                                        (128, 128, 4, 256, "row"), (128, 256, 3, 256, "row"),
                                        (64, 512, 3, 128, "row"), (128, 128, 6, 128, "row")):
                for pc in ("nows", "ws"):
                    out.append(("sp", N, K, M, (bm, M, bk, st, th, 0, pol, pc)))
            for bm, st, th in ((64, 4, 128), (128, 4, 256), (64, 6, 128)):
                for pc in ("nows", "ws"):
                    out.append(("hyb", N, K, M, (bm, M, 64, st, th, 0, "row", pc)))
            for bm, th in ((64, 128), (128, 256)):  # dynamic loop lengths: TileLang 0.1.15 pipelines them in 2 stages
                for pc in ("nows", "ws"):
                    out.append(("hybtm", N, K, M, (bm, M, 64, 2, th, 0, "row", pc)))
        for bm, bn, th in ((128, 256, 256), (128, 128, 256), (64, 256, 128)):
            for pc in ("ws", "nows"):
                out.append(("hybtm", N, K, 2048, (bm, bn, 64, 2, th, 8, "sq", pc)))
    return out


def build(items, dt):
    built = []
    for kind, N, K, M, c in items:
        bm, bn, bk, st, th, swz, pol, pc = c
        try:
            if kind == "sp":
                f = sp_func(N, K, M, bm, bn, bk, st, th, dt, swz, pol)
            elif kind == "dense":
                f = dense_func(N, K, M, bm, bn, bk, st, th, dt, swz, pol)
            elif kind == "hybtm":
                f = hybtm_func(N, K, M, *tm_counts(N, K, TM_FRAC), bm, bn, st, th, dt, swz, pol)
            else:
                nsp = ndn = (K // TILE) // 2
                f = hyb_func(N, K, M, nsp, ndn, bm, bn, st, th, dt, swz, pol)
            built.append(((kind, N, K, M, c), f, {"pc": pc}))
        except Exception as e:  # noqa: BLE001
            log(f"build {kind} {N}x{K} M={M} {c}: FAILED {one_line(e)}")
    return built


def main():
    import tilelang  # noqa: F401

    p = torch.cuda.get_device_properties(0)
    log(f"device {p.name} SMs={p.multi_processor_count} torch {torch.__version__} tilelang {tilelang.__version__}")
    items = configs()
    built = build(items, "bfloat16")
    t = time.time()
    kernels = S.compile_tl(built)
    nok = sum(not isinstance(v, BaseException) for v in kernels.values())
    log(f"compiled {nok}/{len(built)} in {time.time() - t:.1f}s")
    bench = S.Bench()
    gen = torch.Generator(device="cuda")
    rows = []  # (case, label, us, dense_us, err)
    dt = torch.bfloat16
    for (N, K) in S.SHAPES:
        gen.manual_seed(1234 + N)
        w, mask = S.random_24(N, K, dt, "cuda", gen)
        vals, meta = S.pack24(w, mask)
        e16 = S.meta_for_tilelang(meta)
        gh = torch.Generator(device="cuda")
        gh.manual_seed(99 + N)
        hyb = S.make_hybrid(N, K, dt, "cuda", gh)
        he16 = S.meta_for_tilelang(hyb["sp_meta"])
        tm = tile_major_hybrid(N, K, TM_FRAC, dt, "cuda", gh)
        assert (tm["n_sp"], tm["n_dn"]) == tm_counts(N, K, TM_FRAC)
        for M in (16, 64, 2048):
            if S.time_left() < 10:
                log(f"budget: skip {N}x{K} M={M}")
                continue
            x = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.float32).to(dt)
            ref = x.double() @ w.double().t()
            href = x.double() @ hyb["w"].double().t()
            dus = bench.us(lambda: torch.nn.functional.linear(x, w))
            hdus = bench.us(lambda: torch.nn.functional.linear(x, hyb["w"]))
            tref = x.double() @ tm["w"].double().t()
            tdus = bench.us(lambda: torch.nn.functional.linear(x, tm["w"]))
            case = f"{N}x{K} M={M}"
            rows.append((case, "cuBLAS", dus, dus, 0.0))
            log(f"{case} cuBLAS {dus:.1f} us")
            try:  # cuSPARSELt kernel alone (its per-call setup is host time, not counted in a graph)
                wc = torch._cslt_compress(w)
                alg = int(torch._cslt_sparse_mm_search(wc, x.t(), transpose_result=True))
                f = lambda: torch._cslt_sparse_mm(wc, x.t(), transpose_result=True, alg_id=alg)  # noqa: E731
                y = f()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    f()
                us = bench.us(g.replay)
                rows.append((case, f"cuSPARSELt(graph) alg{alg}", us, dus, S.rel_err(y, ref)))
                log(f"{case} cuSPARSELt in a graph {us:.1f} us ({dus / us:.2f}x)")
            except Exception as e:  # noqa: BLE001
                log(f"{case} cuSPARSELt: {one_line(e)[:160]}")
            for key, k in kernels.items():
                kind, kN, kK, kM, c = key
                if (kN, kK, kM) != (N, K, M):
                    continue
                label = f"{kind} bm{c[0]} bn{c[1]} bk{c[2]} st{c[3]} th{c[4]} swz{c[5]} {c[6]} {c[7]}"
                if isinstance(k, BaseException):
                    log(f"{case} {label}: compile FAILED {one_line(k)[:160]}")
                    continue
                if S.time_left() < 8:
                    break
                try:
                    c_out = torch.empty(N, M, dtype=dt, device="cuda")
                    if kind == "sp":
                        f = lambda: k(vals, e16, x, c_out)  # noqa: E731
                        r, base = ref, dus
                    elif kind == "dense":
                        f = lambda: k(w, x, c_out)  # noqa: E731
                        r, base = ref, dus
                    elif kind == "hybtm":
                        f = lambda: k(tm["SPV"], tm["SPE"], tm["SPP"], tm["SPC"], tm["DNV"], tm["DNP"], tm["DNC"], x, c_out)  # noqa: E731
                        r, base = tref, tdus
                    else:
                        f = lambda: k(hyb["sp_vals"], he16, hyb["sp_cols"], hyb["dn_vals"], hyb["dn_cols"], x, c_out)  # noqa: E731
                        r, base = href, hdus
                    f()
                    err = S.rel_err(c_out.t(), r)
                    us = bench.us(f)
                    rows.append((case, label, us, base, err))
                    log(f"{case} {label}: {us:.1f} us  {base / us:.2f}x  err {err:.1e}")
                except Exception as e:  # noqa: BLE001
                    S.timing_failed(f"{case} {label}", e)
            del x, ref, href
        del w, mask, vals, meta, e16, hyb, tm
        torch.cuda.empty_cache()
    print("\n## best per case and kind (ratio = cuBLAS on the same weight / this; err < 2e-2)", flush=True)
    for case in dict.fromkeys(r[0] for r in rows):
        for kind in ("sp ", "dense ", "hyb ", "hybtm ", "cuSPARSELt"):
            rs = [r for r in rows if r[0] == case and r[1].startswith(kind) and r[4] < 2e-2]
            if rs:
                b = max(rs, key=lambda r: r[3] / r[2])
                print(f"{case:20s} {b[1]:58s} {b[2]:8.1f} us  {b[3] / b[2]:5.2f}x", flush=True)
    log("done")


if __name__ == "__main__":
    main()
