#!/usr/bin/env python3
"""Hybrid-GEMM route spike, work-list form: can a TileLang hybrid kernel keep the speed of the all-2:4
``T.gemm_sp`` kernel (sweep.py: 1.43x / 1.51x over cuBLAS at 16 / 64 tokens on 4096x11008, NVIDIA H200)?

sweep.py's hybrid kernels loop over each tile-row's own tile counts; TileLang pipelines such data-dependent
loops in 2 stages only, in 64-column steps, and they reached 0.3-0.7x. Here every block runs a loop of a fixed
length: the 2:4 tiles of a tile-row (and, apart, its dense tiles) are cut into work items of ``C`` tiles, the
last item of a row padded with an all-zero tile (one copy, read from L2). Items of one tile-row add their fp32
partial products into the output with atomics (``T.atomic_add``), and a cast gives the 16-bit result. Weights
are tile-major (each tile's 2:4 values, metadata or dense block contiguous), so every weight copy is one TMA
copy, ``tps`` tiles per pipeline step.

Per shape (4096x11008, 11008x4096), fraction of 2:4 tiles (0.5, 0.9) and token count (16, 64, 2048): cuBLAS on
the same masked weight, the all-2:4 ``gemm_sp`` kernel (sweep.py's best tiles) on an all-2:4 weight, and each
work-list configuration, checked against float64 first (``err``). ``total`` also counts zeroing the fp32 output
and the cast (what a layer would pay); ``kernel`` is the kernel alone. Bound: 1 / (1 - 0.4375 f).

Env: SWEEP_BUDGET_S (default 240). Run by `SWEEP_BUDGET_S=240 bash benchmarks/spikes/gemm_route/sweep.sh worklist`.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spike as S  # noqa: E402
import sweep as S_sweep  # noqa: E402  (its sp_func: the all-2:4 kernel; random_tile_map)

log, one_line, TILE, SHAPES = S.log, S.one_line, S.TILE, S.SHAPES  # (importing sweep set the budget)
FRACS = [0.9, 0.5]
TOKENS = [16, 64, 2048]


def worklist(N, K, frac, C, dt, device, seed):
    """A random hybrid weight (``frac`` of the tiles 2:4 at random places, random 2:4 patterns) as tile-major
    arrays plus a zero tile at the end of each, and its work items: per kind, each tile-row's tiles in column
    order cut into items of ``C`` (the last padded with the zero tile, column 0)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    R, Cn = N // TILE, K // TILE
    w, is_sp, tiles, mtiles = S_sweep.random_tile_map(N, K, frac, dt, device, gen, seed)
    sel = is_sp.to(device)
    sp_t, sp_m = tiles[sel], mtiles[sel]  # (r, c) row-major order
    zero_m = torch.zeros(TILE, TILE, dtype=torch.bool, device=device)
    zero_m[:, 0::4] = zero_m[:, 1::4] = True  # a valid pattern (positions 0, 1) for the zero tile
    sp_t = torch.cat([sp_t, torch.zeros(1, TILE, TILE, dtype=dt, device=device)])
    sp_m = torch.cat([sp_m, zero_m[None]])
    n_sp = sp_t.shape[0]
    vals, meta = S.pack24(sp_t.reshape(-1, TILE), sp_m.reshape(-1, TILE))
    dn_t = torch.cat([tiles[~sel], torch.zeros(1, TILE, TILE, dtype=dt, device=device)]).contiguous()

    def items(kind_mask, zero_index):
        idx, col, row = [], [], []
        base = 0
        for r in range(R):
            cols = torch.nonzero(kind_mask[r]).flatten().tolist()
            ids = list(range(base, base + len(cols)))
            base += len(cols)
            for i in range(0, len(cols), C):
                chunk_i, chunk_c = ids[i:i + C], cols[i:i + C]
                pad = C - len(chunk_i)
                idx += chunk_i + [zero_index] * pad
                col += chunk_c + [0] * pad
                row.append(r)
        t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
        return t(idx), t(col), t(row)

    sidx, scol, srow = items(is_sp, n_sp - 1)
    didx, dcol, drow = items(~is_sp, dn_t.shape[0] - 1)
    return dict(w=w, SPV=vals.reshape(n_sp, TILE, TILE // 2),
                SPE=S.meta_for_tilelang(meta).reshape(n_sp, TILE, TILE // 16), SIDX=sidx, SCOL=scol, SROW=srow,
                DNV=dn_t, DIDX=didx, DCOL=dcol, DROW=drow, n_sp_items=srow.numel(), n_dn_items=drow.numel(),
                pad=(sidx.numel() + didx.numel()) / (R * Cn) - 1)


def wl_func(N, K, M, L, C, bm, bn, tps, stages, threads, dt, kinds):
    """One launch over the work items of ``kinds`` ("sp", "dn" or both: 2:4 items first, then dense items);
    blocks of ``bm`` rows of one item x ``bn`` tokens, ``C / tps`` pipelined steps of ``tps`` tiles."""
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    TPB = TILE // bm
    nsp_t, ndn_t, n_si, n_di = L["SPV"].shape[0], L["DNV"].shape[0], L["n_sp_items"], L["n_dn_items"]
    nb_sp = n_si * TPB if "sp" in kinds else 0
    nb = nb_sp + (n_di * TPB if "dn" in kinds else 0)
    pol = P.FullRow if bn <= 64 else P.Square
    H = TILE // 2

    @T.macro
    def sp_copy(SPV, SPE, SIDX, SCOL, X, A_s, E_s, B_s, e, r0, bx, j):
        T.copy(SPV[SIDX[e], r0:r0 + bm, 0:H], A_s[0:bm, j * H:(j + 1) * H])
        T.copy(SPE[SIDX[e], r0:r0 + bm, 0:TILE // 16], E_s[0:bm, j * TILE // 16:(j + 1) * TILE // 16])
        T.copy(X[bx * bn:bx * bn + bn, SCOL[e] * TILE:SCOL[e] * TILE + TILE], B_s[0:bn, j * TILE:(j + 1) * TILE])

    @T.macro
    def dn_copy(DNV, DIDX, DCOL, X, D_s, B2_s, e, r0, bx, j):
        T.copy(DNV[DIDX[e], r0:r0 + bm, 0:TILE], D_s[0:bm, j * TILE:(j + 1) * TILE])
        T.copy(X[bx * bn:bx * bn + bn, DCOL[e] * TILE:DCOL[e] * TILE + TILE], B2_s[0:bn, j * TILE:(j + 1) * TILE])

    @T.macro
    def sp_part(SPV, SPE, SIDX, SCOL, SROW, X, Cf, A_s, E_s, B_s, C_l, item, r0, bx):
        T.clear(C_l)
        for k in T.Pipelined(C // tps, num_stages=stages):
            sp_copy(SPV, SPE, SIDX, SCOL, X, A_s, E_s, B_s, item * C + k * tps, r0, bx, 0)
            if tps == 2:  # (a parse-time branch: T.unroll around the copies keeps them from becoming TMA copies)
                sp_copy(SPV, SPE, SIDX, SCOL, X, A_s, E_s, B_s, item * C + k * tps + 1, r0, bx, 1)
            T.gemm_sp(A_s, E_s, B_s, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
        T.atomic_add(Cf[SROW[item] * TILE + r0:SROW[item] * TILE + r0 + bm, bx * bn:bx * bn + bn], C_l)

    @T.macro
    def dn_part(DNV, DIDX, DCOL, DROW, X, Cf, D_s, B2_s, C_l, item, r0, bx):
        T.clear(C_l)
        for k in T.Pipelined(C // tps, num_stages=stages):
            dn_copy(DNV, DIDX, DCOL, X, D_s, B2_s, item * C + k * tps, r0, bx, 0)
            if tps == 2:
                dn_copy(DNV, DIDX, DCOL, X, D_s, B2_s, item * C + k * tps + 1, r0, bx, 1)
            T.gemm(D_s, B2_s, C_l, transpose_A=False, transpose_B=True, policy=pol)
        T.atomic_add(Cf[DROW[item] * TILE + r0:DROW[item] * TILE + r0 + bm, bx * bn:bx * bn + bn], C_l)

    both = len(kinds) == 2

    @T.prim_func
    def main(SPV: T.Tensor((nsp_t, TILE, H), dt), SPE: T.Tensor((nsp_t, TILE, TILE // 16), "int16"),
             SIDX: T.Tensor((n_si * C,), "int32"), SCOL: T.Tensor((n_si * C,), "int32"),
             SROW: T.Tensor((n_si,), "int32"), DNV: T.Tensor((ndn_t, TILE, TILE), dt), DIDX: T.Tensor((n_di * C,), "int32"),
             DCOL: T.Tensor((n_di * C,), "int32"), DROW: T.Tensor((n_di,), "int32"),
             X: T.Tensor((M, K), dt), Cf: T.Tensor((N, M), "float32")):
        with T.Kernel(T.ceildiv(M, bn), nb, threads=threads) as (bx, by):
            if "sp" in kinds:  # one accumulator per kind: gemm_sp and gemm give their fragments different layouts
                C_sp = T.alloc_fragment((bm, bn), "float32")
                A_s = T.alloc_shared((bm, tps * H), dt)
                E_s = T.alloc_shared((bm, tps * TILE // 16), "int16")
                B_s = T.alloc_shared((bn, tps * TILE), dt)
            if "dn" in kinds:
                C_dn = T.alloc_fragment((bm, bn), "float32")
                D_s = T.alloc_shared((bm, tps * TILE), dt)
                B2_s = T.alloc_shared((bn, tps * TILE), dt)
            if both:
                if by < nb_sp:
                    sp_part(SPV, SPE, SIDX, SCOL, SROW, X, Cf, A_s, E_s, B_s, C_sp, by // TPB, (by % TPB) * bm, bx)
                else:
                    dn_part(DNV, DIDX, DCOL, DROW, X, Cf, D_s, B2_s, C_dn, (by - nb_sp) // TPB,
                            ((by - nb_sp) % TPB) * bm, bx)
            elif "sp" in kinds:
                sp_part(SPV, SPE, SIDX, SCOL, SROW, X, Cf, A_s, E_s, B_s, C_sp, by // TPB, (by % TPB) * bm, bx)
            else:
                dn_part(DNV, DIDX, DCOL, DROW, X, Cf, D_s, B2_s, C_dn, by // TPB, (by % TPB) * bm, bx)

    return main


def configs():
    """[(M, C, bm, bn, tps, stages, threads, kinds, pc)]: one tile per pipeline step (two need the metadata of two
    tiles side by side in shared memory, which a TMA copy of tile-major metadata cannot write)."""
    out = []
    for M in (16, 64):
        for C, st in ((8, 4), (8, 6), (16, 6), (16, 8)):
            out.append((M, C, 64, M, 1, st, 128, ("sp", "dn"), "ws"))
        out.append((M, 16, 64, M, 1, 6, 128, ("sp", "dn"), "nows"))
        for C in (8, 16):  # the two kinds as two launches, each with its own depth
            out.append((M, C, 64, M, 1, 8, 128, ("sp",), "ws"))
            out.append((M, C, 64, M, 1, 6, 128, ("dn",), "ws"))
    for bm, bn, st, th in ((128, 256, 2, 256), (128, 128, 3, 256)):  # (both kinds in one launch: no warp split)
        out.append((2048, 8, bm, bn, 1, st, th, ("sp",), "ws"))
        out.append((2048, 8, bm, bn, 1, st, th, ("dn",), "ws"))
    return out


def main():
    import tilelang

    p = torch.cuda.get_device_properties(0)
    log(f"device {p.name} SMs={p.multi_processor_count} torch {torch.__version__} tilelang {tilelang.__version__}")
    dt, dts = torch.bfloat16, "bfloat16"
    layouts, built = {}, []
    for (N, K) in SHAPES:
        for frac in FRACS:
            for C in (8, 16):
                layouts[(N, K, frac, C)] = worklist(N, K, frac, C, dt, "cuda", 1000 + N + int(100 * frac))
            for cfg in configs():
                M, C, bm, bn, tps, st, th, kinds, pc = cfg
                try:
                    f = wl_func(N, K, M, layouts[(N, K, frac, C)], C, bm, bn, tps, st, th, dts, kinds)
                    built.append(((N, K, frac, cfg), f, {"pc": pc}))
                except Exception as e:  # noqa: BLE001
                    log(f"build {N}x{K} f={frac} {cfg}: FAILED {one_line(e)}")
        for M, (bm, bn, bk, st, th) in ((16, (64, 16, 256, 4, 128)), (64, (64, 64, 256, 4, 128)),
                                         (2048, (128, 256, 128, 2, 256))):
            pol = "row" if M <= 64 else "sq"
            built.append(((N, K, 1.0, ("allsp", M, bm, bn, bk, st, th)),
                          S_sweep.sp_func(N, K, M, bm, bn, bk, st, th, dts, 0 if M <= 64 else 8, pol), {"pc": "ws"}))
    t = time.time()
    kernels = S.compile_tl(built)
    log(f"compiled {sum(not isinstance(v, BaseException) for v in kernels.values())}/{len(built)} in "
        f"{time.time() - t:.1f}s")
    bench = S.Bench()
    rows = []
    for (N, K) in SHAPES:
        gen = torch.Generator(device="cuda")
        gen.manual_seed(5 + N)
        w24, m24 = S.random_24(N, K, dt, "cuda", gen)
        vals, meta = S.pack24(w24, m24)
        e16 = S.meta_for_tilelang(meta)
        for M in TOKENS:
            if S.time_left() < 10:
                log(f"budget: skip {N}x{K} M={M}")
                continue
            x = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.float32).to(dt)
            out = torch.empty(N, M, dtype=dt, device="cuda")
            k = next((v for (n, kk, f, c), v in kernels.items() if (n, kk, f) == (N, K, 1.0) and c[1] == M), None)
            dus = bench.us(lambda: torch.nn.functional.linear(x, w24))
            if k is not None and not isinstance(k, BaseException):
                k(vals, e16, x, out)
                err = S.rel_err(out.t(), x.double() @ w24.double().t())
                us = bench.us(lambda: k(vals, e16, x, out))
                log(f"{N}x{K} M={M} all 2:4: cuBLAS {dus:.1f} us, gemm_sp {us:.1f} us ({dus / us:.2f}x, bound 1.78x) "
                    f"err {err:.1e}")
                rows.append((f"{N}x{K} M={M} f=1.0", "allsp", dus, us, us, err))
            for frac in FRACS:
                bound = 1 / (1 - 0.4375 * frac)
                wref = layouts[(N, K, frac, 8)]["w"]
                ref = x.double() @ wref.double().t()
                hdus = bench.us(lambda: torch.nn.functional.linear(x, wref))
                case = f"{N}x{K} M={M} f={frac}"
                log(f"{case} cuBLAS {hdus:.1f} us, bound {bound:.2f}x, padding {layouts[(N, K, frac, 8)]['pad']:.1%} "
                    f"(C=8) / {layouts[(N, K, frac, 16)]['pad']:.1%} (C=16)")
                cf = torch.empty(N, M, dtype=torch.float32, device="cuda")
                two = {}
                for key, kern in kernels.items():
                    kN, kK, kf, cfg = key
                    if (kN, kK, kf) != (N, K, frac) or cfg[0] != M:
                        continue
                    _, C, bm, bn, tps, st, th, kinds, pc = cfg
                    label = f"C{C} bm{bm} bn{bn} tps{tps} st{st} th{th} {'+'.join(kinds)} {pc}"
                    if isinstance(kern, BaseException):
                        log(f"{case} {label}: compile FAILED {one_line(kern)[:200]}")
                        continue
                    if S.time_left() < 8:
                        break
                    L = layouts[(N, K, frac, C)]
                    args = [L[n] for n in ("SPV", "SPE", "SIDX", "SCOL", "SROW", "DNV", "DIDX", "DCOL", "DROW")]
                    try:
                        if len(kinds) == 1:
                            two[kinds[0]] = (kern, args)
                            if len(two) < 2:
                                continue
                            (k1, a1), (k2, a2) = two.pop("sp"), two.pop("dn")
                            call = lambda k1=k1, a1=a1, k2=k2, a2=a2: (k1(*a1, x, cf), k2(*a2, x, cf))
                            label = label.replace("dn ", "sp|dn (two launches) ")
                        else:
                            call = lambda kern=kern, args=args: kern(*args, x, cf)
                        cf.zero_()
                        call()
                        err = S.rel_err(cf.t(), ref)
                        kus = bench.us(lambda: (cf.zero_(), call()))
                        tus = bench.us(lambda: (cf.zero_(), call(), out.copy_(cf)))
                        rows.append((case, label, hdus, kus, tus, err))
                        log(f"{case} {label}: kernel {kus:.1f} us ({hdus / kus:.2f}x), total {tus:.1f} us "
                            f"({hdus / tus:.2f}x, {hdus / tus / bound:.0%} of bound)  err {err:.1e}")
                    except Exception as e:  # noqa: BLE001
                        S.timing_failed(f"{case} {label}", e)
    S.print_best("total incl. zeroing the output and the cast", [(c, lb, base, tus, err) for c, lb, base, _, tus, err
                                                                   in rows])
    log("done")


def selftest():
    """On the CPU: the work items rebuild the weight (every tile once, padding all zero)."""
    for N, K, frac, C in ((256, 1024, 0.5, 8), (384, 640, 0.9, 4)):
        L = worklist(N, K, frac, C, torch.float32, "cpu", 3)
        w = torch.zeros(N, K)
        sp = S.unpack24(L["SPV"].reshape(-1, TILE // 2), L["SPE"].reshape(-1, TILE // 16).view(torch.uint8),
                        TILE).reshape(-1, TILE, TILE)
        for kind, tiles in (("S", sp), ("D", L["DNV"])):
            idx, col, row = L[kind + "IDX"], L[kind + "COL"], L[kind + "ROW"]
            for i in range(idx.numel()):
                r, c = int(row[i // C]), int(col[i])
                w[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] += tiles[int(idx[i])]
        assert torch.equal(w, L["w"]), (N, K, frac, C)
        assert not sp[-1].any() and not L["DNV"][-1].any()
    print("selftest passed")


if __name__ == "__main__":
    selftest() if "--selftest" in sys.argv else main()
