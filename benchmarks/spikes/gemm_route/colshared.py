#!/usr/bin/env python3
"""Hybrid-GEMM route spike, column-shared tile maps: how fast is a hybrid layer whose tile columns are each 2:4 in
every tile-row or dense in every tile-row?

Such a layer needs no hybrid kernel: ``y = x[:, S] @ W_S^T + x[:, D] @ W_D^T`` with ``W_S`` all 2:4 (TileLang
``T.gemm_sp``, sweep.py's best tiles per token count; cuSPARSELt too at 2048 tokens) and ``W_D`` dense (cuBLAS
``addmm`` adding onto the 2:4 part). One-shot masks of this shape cost no measurable quality on SmolLM2-135M
(``benchmarks/results/tile_structure_cpu.md``). Timed as a layer would run: the two column gathers of x, both
GEMMs, and the transpose back to ``[tokens, out]``, captured in one CUDA graph; against cuBLAS ``F.linear`` on the
same masked weight in its original column order. Every variant is checked against float64 first.

Per shape (4096x11008, 11008x4096, out x in), fraction f of 2:4 tile columns (0.5, 0.9; bound 1 / (1 - 0.4375 f))
and token count (16, 64, 256, 2048). Env: SWEEP_BUDGET_S (default 240). Run:
``SWEEP_BUDGET_S=240 bash benchmarks/spikes/gemm_route/sweep.sh colshared``.

``--streams``: the two-kernel route with the dense part on a second stream of the graph, and with a split-K 2:4
kernel (16 and 64 tokens).

``--fused``: the routes a pack-time column permutation allows (the layer's 2:4 columns first, the permutation folded
into whatever writes x), with no gathers and no transpose: two kernels (``T.gemm_sp`` reading the first ``ks``
columns of x in place and writing ``y`` [tokens, out] directly, then cuBLAS ``y += x[:, ks:] @ W_D^T``), or one
(``cs_func``: both loops, one accumulator); with the per-kernel times (torch.profiler) of the gather route beside. Run: ``... sweep.sh colshared --fused``.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spike as S  # noqa: E402
import sweep as S_sweep  # noqa: E402

log, one_line, TILE, SHAPES = S.log, S.one_line, S.TILE, S.SHAPES  # (importing sweep set the budget)
DT, DTS = torch.bfloat16, "bfloat16"
FRACS = [0.9, 0.5]
TOKENS = [16, 64, 256, 2048]
SP_TILES = {  # tokens -> [(bm, bn, bk, stages, threads, swizzle, policy)]: sweep.py's winners and neighbours
    16: [(64, 16, 256, 4, 128, 0, "row"), (64, 16, 128, 6, 128, 0, "row")],
    64: [(64, 64, 256, 4, 128, 0, "row"), (64, 64, 128, 6, 128, 0, "row")],
    256: [(128, 128, 128, 3, 256, 8, "sq"), (64, 128, 256, 3, 128, 0, "row"), (128, 256, 128, 2, 256, 8, "sq")],
    2048: [(128, 256, 128, 2, 256, 8, "sq"), (256, 128, 128, 2, 256, 8, "sq")],
}


def split_columns(K, frac, seed):
    """Tile columns of a column-shared map: ``frac`` of them 2:4 (rounded so that the 2:4 part is a multiple of 256
    columns, the kernels' widest step), at random places. Returns the 2:4 and the dense column indices."""
    n = K // TILE
    n_sp = min(n, max(2, round(frac * n / 2) * 2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sp_t, dn_t = order[:n_sp].sort().values, order[n_sp:].sort().values
    cols = lambda t: (t[:, None] * TILE + torch.arange(TILE)[None, :]).reshape(-1)  # noqa: E731
    return cols(sp_t), cols(dn_t)


def spT_func(N, ks, K, M, bm, bn, bk, stages, threads, dt, swz, policy):
    """``C[M, N] = X[:, :ks] @ A^T`` with A [N, ks] 2:4: x read in place (row stride K), the tile written
    transposed, so that no gather or transpose kernel is needed around it (``sweep.sp_func``'s options)."""
    return S_sweep.sp_func(N, ks, M, bm, bn, bk, stages, threads, dt, swz, policy, x_cols=K, store="y")


H_TILES = {  # tokens -> [(bm, bn, bk 2:4, bk dense, stages, threads, swizzle, policy)] for cs_func
    16: [(64, 16, 256, 128, 4, 128, 0, "row"), (64, 16, 256, 256, 3, 128, 0, "row"), (64, 16, 128, 128, 6, 128, 0, "row")],
    64: [(64, 64, 256, 128, 3, 128, 0, "row"), (64, 64, 256, 64, 3, 128, 0, "row"), (64, 64, 128, 128, 4, 128, 0, "row")],
    256: [(128, 128, 128, 64, 3, 256, 8, "sq"), (64, 128, 128, 64, 3, 128, 0, "row")],
    2048: [(128, 128, 128, 64, 2, 256, 8, "sq"), (128, 256, 64, 64, 2, 256, 8, "sq")],
}


def spK_func(N, ks, K, M, bm, bn, bk, stages, threads, dt, split):
    """``Cf[N, M] += A @ X[:, :ks]^T`` in fp32 with split-K: block ``bz`` of ``split`` takes its share of the
    2:4 steps and adds its tile with ``T.atomic_add`` (more blocks than ``N / bm`` when N is small)."""
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    nks = ks // bk // split

    @T.prim_func
    def main(Ws: T.Tensor((N, ks // 2), dt), E: T.Tensor((N, ks // 16), "int16"), X: T.Tensor((M, K), dt),
             Cf: T.Tensor((N, M), "float32")):
        with T.Kernel(T.ceildiv(M, bn), T.ceildiv(N, bm), split, threads=threads) as (bx, by, bz):
            A_s = T.alloc_shared((bm, bk // 2), dt)
            E_s = T.alloc_shared((bm, bk // 16), "int16")
            B_s = T.alloc_shared((bn, bk), dt)
            C_l = T.alloc_fragment((bm, bn), "float32")
            T.clear(C_l)
            for k in T.Pipelined(nks, num_stages=stages):
                T.copy(Ws[by * bm, (bz * nks + k) * bk // 2], A_s)
                T.copy(E[by * bm, (bz * nks + k) * bk // 16], E_s)
                T.copy(X[bx * bn, (bz * nks + k) * bk], B_s)
                T.gemm_sp(A_s, E_s, B_s, C_l, transpose_A=False, transpose_E=False, transpose_B=True,
                          policy=P.FullRow)
            T.atomic_add(Cf[by * bm:by * bm + bm, bx * bn:bx * bn + bn], C_l)

    return main


def cs_func(N, ks, K, M, bm, bn, bks, bkd, stages, threads, dt, swz, policy):
    """One launch for a column-shared layer whose 2:4 columns come first: ``C[M, N] = X[:, :ks] @ A^T +
    X[:, ks:] @ D^T``, A [N, ks] 2:4 (values, TileLang metadata) by ``T.gemm_sp``, D [N, K - ks] dense by
    ``T.gemm``, one fp32 accumulator, static loop lengths (every copy can be a TMA copy), the tile written
    transposed."""
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    pol = {"sq": P.Square, "row": P.FullRow, "col": P.FullCol}[policy]
    kd = K - ks

    @T.prim_func
    def main(Ws: T.Tensor((N, ks // 2), dt), E: T.Tensor((N, ks // 16), "int16"), Wd: T.Tensor((N, kd), dt),
             X: T.Tensor((M, K), dt), C: T.Tensor((M, N), dt)):
        with T.Kernel(T.ceildiv(M, bn), T.ceildiv(N, bm), threads=threads) as (bx, by):
            A_s = T.alloc_shared((bm, bks // 2), dt)
            E_s = T.alloc_shared((bm, bks // 16), "int16")
            B_s = T.alloc_shared((bn, bks), dt)
            D_s = T.alloc_shared((bm, bkd), dt)
            B2_s = T.alloc_shared((bn, bkd), dt)
            C_l = T.alloc_fragment((bm, bn), "float32")
            T.use_swizzle(panel_size=swz, enable=swz > 0)
            T.clear(C_l)
            for k in T.Pipelined(ks // bks, num_stages=stages):
                T.copy(Ws[by * bm, k * bks // 2], A_s)
                T.copy(E[by * bm, k * bks // 16], E_s)
                T.copy(X[bx * bn, k * bks], B_s)
                T.gemm_sp(A_s, E_s, B_s, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
            for k in T.Pipelined(kd // bkd, num_stages=stages):
                T.copy(Wd[by * bm, k * bkd], D_s)
                T.copy(X[bx * bn, ks + k * bkd], B2_s)
                T.gemm(D_s, B2_s, C_l, transpose_A=False, transpose_B=True, policy=pol)
            for i, j in T.Parallel(bm, bn):
                C[bx * bn + j, by * bm + i] = C_l[i, j]

    return main


def layer(N, K, frac, dt, seed, device="cuda"):
    """The masked weight ``w`` [N, K] of a column-shared hybrid layer, its 2:4 part packed (values, TileLang
    metadata) and its dense part, with the column indices of each."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    sp_idx, dn_idx = (i.to(device) for i in split_columns(K, frac, seed))
    w24, m24 = S.random_24(N, sp_idx.numel(), dt, device, gen)
    wd = torch.randn(N, dn_idx.numel(), generator=gen, device=device, dtype=torch.float32).to(dt)
    w = torch.empty(N, K, dtype=dt, device=device)
    w[:, sp_idx] = w24
    w[:, dn_idx] = wd
    vals, meta = S.pack24(w24, m24)
    return dict(w=w, w24=w24, vals=vals, e16=S.meta_for_tilelang(meta), wd=wd, sp_idx=sp_idx, dn_idx=dn_idx)


def start(built):
    """Log the device, compile ``built`` (duplicates dropped) and log what failed; return the kernels and a timer."""
    import tilelang

    p = torch.cuda.get_device_properties(0)
    log(f"device {p.name} SMs={p.multi_processor_count} torch {torch.__version__} tilelang {tilelang.__version__}")
    built = list({k: (k, f, o) for k, f, o in built}.values())  # (both fractions may give one 2:4 width)
    t = time.time()
    kernels = S.compile_tl(built)
    bad = [(k, v) for k, v in kernels.items() if isinstance(v, BaseException)]
    log(f"compiled {len(kernels) - len(bad)}/{len(built)} in {time.time() - t:.1f}s")
    for k, v in bad[:3]:
        log(f"  {k}: {one_line(v)[:200]}")
    return kernels, S.Bench()


def cases(tokens, permuted):
    """Every (shape, fraction, token count) within the budget: ``(L, ks, wt, bound, M, x, ref, case)``, ``wt``
    the weight x multiplies (its columns permuted, 2:4 part first, when ``permuted``), ``ref`` in float64."""
    for N, K in SHAPES:
        for frac in FRACS:
            L = layer(N, K, frac, DT, 11 + N)
            ks = L["sp_idx"].numel()
            wt = torch.cat([L["w24"], L["wd"]], 1) if permuted else L["w"]
            bound = 1 / (1 - 0.4375 * ks / K)
            for M in tokens:
                if S.time_left() < 12:
                    log(f"budget: skip {N}x{K} f={frac} M={M}")
                    continue
                gen = torch.Generator(device="cuda")
                gen.manual_seed(M)
                x = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.float32).to(DT)
                yield L, ks, wt, bound, M, x, x.double() @ wt.double().t(), f"{N}x{K} f={ks / K:.2f} M={M}"


def cublas_us(bench, x, wt, case, bound, rows) -> float:
    """cuBLAS ``x @ wt^T`` (``F.linear`` without bias: the same call) in a CUDA graph, logged and recorded."""
    y0 = torch.empty(x.shape[0], wt.shape[0], dtype=DT, device="cuda")
    torch.mm(x, wt.t(), out=y0)
    g0 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g0):
        torch.mm(x, wt.t(), out=y0)
    dus = bench.us(g0.replay)
    log(f"{case} cuBLAS {dus:.1f} us, bound {bound:.2f}x")
    rows.append((case, "cuBLAS", dus, dus, 0.0))
    return dus


def time_variants(bench, case, variants, y, ref, dus, bound, rows) -> None:
    """Check each ``(label, run)`` (its result in ``y``) against ``ref``, then time it as a CUDA graph; a label
    with ``alone`` times one part of a route (not checked, not a row of the table)."""
    for label, run in variants:
        if S.time_left() < 8:
            break
        part = "alone" in label
        try:
            run()
            torch.cuda.synchronize()
            err = 0.0 if part else S.rel_err(y, ref)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            us = bench.us(g.replay)
            if not part:
                rows.append((case, label, dus, us, err))
            log(f"{case} {label}: {us:.1f} us  {dus / us:.2f}x ({dus / us / bound:.0%} of bound)  err {err:.1e}")
        except Exception as e:  # noqa: BLE001
            S.timing_failed(f"{case} {label}", e)


def cslt_variant(L, xs, case, run):
    """``(label, run(wc, alg))`` for cuSPARSELt on the 2:4 part (its best algorithm for ``xs``), or None."""
    try:
        wc = torch._cslt_compress(L["w24"])
        alg = int(torch._cslt_sparse_mm_search(wc, xs.t()))
        return f"cuSPARSELt alg{alg}", lambda: run(wc, alg)
    except Exception as e:  # noqa: BLE001
        log(f"{case} cuSPARSELt: {one_line(e)[:160]}")
        return None


def sp_kernels(tokens, make):
    """``[(key, TileLang func, options)]``: ``make(N, K, ks, M)`` -> [(key suffix, func)] for every case."""
    built = []
    for N, K in SHAPES:
        for frac in FRACS:
            ks = split_columns(K, frac, 0)[0].numel()
            for M in tokens:
                built += [((N, ks, M) + key, f, {"pc": "ws"}) for key, f in make(N, K, ks, M)]
    return built


def main():
    """The gather route: both column gathers of x, ``gemm_sp`` (or cuSPARSELt), cuBLAS ``addmm``, transpose."""
    def make(N, K, ks, M):
        return [((cfg,), S_sweep.sp_func(N, ks, M, *cfg[:5], DTS, *cfg[5:])) for cfg in SP_TILES[M]
                if ks % cfg[2] == 0]

    kernels, bench = start(sp_kernels(TOKENS, make))
    rows = []
    for L, ks, wt, bound, M, x, ref, case in cases(TOKENS, permuted=False):
        N, K = wt.shape
        dus = cublas_us(bench, x, wt, case, bound, rows)
        xs = torch.empty(M, ks, dtype=DT, device="cuda")
        xd = torch.empty(M, K - ks, dtype=DT, device="cuda")
        c = torch.empty(N, M, dtype=DT, device="cuda")
        y = torch.empty(M, N, dtype=DT, device="cuda")

        def gathers():
            torch.index_select(x, 1, L["sp_idx"], out=xs)
            torch.index_select(x, 1, L["dn_idx"], out=xd)

        def rest():
            c.addmm_(L["wd"], xd.t())
            y.copy_(c.t())

        variants = []
        for key, k in kernels.items():
            if key[:3] != (N, ks, M) or isinstance(k, BaseException):
                continue

            def run(k=k):
                gathers()
                k(L["vals"], L["e16"], xs, c)
                rest()

            cfg = key[3]
            variants.append((f"gemm_sp bm{cfg[0]} bn{cfg[1]} bk{cfg[2]} st{cfg[3]} th{cfg[4]}", run))
        if M >= 256:
            def run_cslt(wc, alg):
                gathers()
                c.copy_(torch._cslt_sparse_mm(wc, xs.t(), alg_id=alg))
                rest()

            variants.append(cslt_variant(L, xs, case, run_cslt))
        time_variants(bench, case, [v for v in variants if v], y, ref, dus, bound, rows)
    S.print_best("the gathers, both GEMMs and the transpose, one CUDA graph", rows, 28, 44)
    log("done")


def kernel_table(fn, n=10):
    """Per-kernel device time of one eager call of ``fn`` (torch.profiler), L2 not flushed: [(name, us)]."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if t:
            out.append((ev.key[:48], float(t) / n))
    return sorted(out, key=lambda r: -r[1])


def fused():
    """The two-kernel and one-kernel routes (2:4 columns first) against cuBLAS, each part alone, and the gather
    route's per-kernel times."""
    tokens = [16, 64, 256, 2048]

    def make(N, K, ks, M):
        out = []
        for cfg in SP_TILES[M]:
            if ks % cfg[2] == 0:
                out += [(("T",) + cfg, spT_func(N, ks, K, M, *cfg[:5], DTS, *cfg[5:])),
                        (("C",) + cfg, S_sweep.sp_func(N, ks, M, *cfg[:5], DTS, *cfg[5:]))]
        for cfg in H_TILES[M]:
            if ks % cfg[2] == 0 and (K - ks) % cfg[3] == 0:
                out.append((("H",) + cfg, cs_func(N, ks, K, M, *cfg[:6], DTS, *cfg[6:])))
        return out

    kernels, bench = start(sp_kernels(tokens, make))
    rows = []
    for L, ks, wt, bound, M, x, ref, case in cases(tokens, permuted=True):
        N, K = wt.shape
        wd = L["wd"]
        dus = cublas_us(bench, x, wt, case, bound, rows)
        y = torch.empty(M, N, dtype=DT, device="cuda")
        xs = x[:, :ks].contiguous()
        c = torch.empty(N, M, dtype=DT, device="cuda")
        variants, parts = [], []
        for key, k in kernels.items():
            if key[:3] != (N, ks, M) or isinstance(k, BaseException):
                continue
            kind, cfg = key[3], key[4:]
            label = f"bm{cfg[0]} bn{cfg[1]} bk{cfg[2]} st{cfg[3]} th{cfg[4]}"
            if kind == "H":
                label = f"bm{cfg[0]} bn{cfg[1]} bk{cfg[2]}/{cfg[3]} st{cfg[4]} th{cfg[5]}"
                variants.append((f"1 kernel {label}", lambda k=k: k(L["vals"], L["e16"], wd, x, y)))
            elif kind == "T":
                def run(k=k):
                    k(L["vals"], L["e16"], x, y)
                    y.addmm_(x[:, ks:], wd.t())

                variants += [(f"2 kernels {label}", run),
                             (f"gemm_sp->y alone {label}", lambda k=k: k(L["vals"], L["e16"], x, y))]
            else:
                parts.append((label, lambda k=k: k(L["vals"], L["e16"], xs, c)))
        if M >= 256:
            def run_cslt(wc, alg):
                z = torch._cslt_sparse_mm(wc, x[:, :ks].t(), alg_id=alg, transpose_result=True)
                z.addmm_(x[:, ks:], wd.t())
                y.copy_(z)

            v = cslt_variant(L, xs, case, run_cslt)
            if v:
                variants.append((v[0] + " 2 kernels+copy", v[1]))
        variants.append(("addmm dense part alone", lambda: y.addmm_(x[:, ks:], wd.t())))
        time_variants(bench, case, variants, y, ref, dus, bound, rows)
        if parts and M in (16, 2048) and S.time_left() > 15:  # the gather route, eagerly, kernel by kernel (L2 warm)
            label, spk = parts[0]
            xd = torch.empty(M, K - ks, dtype=DT, device="cuda")

            def gather_route(spk=spk):
                torch.index_select(x, 1, L["sp_idx"], out=xs)
                torch.index_select(x, 1, L["dn_idx"], out=xd)
                spk()
                c.addmm_(L["wd"], xd.t())
                y.copy_(c.t())

            try:
                tab = kernel_table(gather_route)
                log(f"{case} gather route {label}, per kernel (us, L2 warm): "
                    + "; ".join(f"{n} {t:.1f}" for n, t in tab))
            except Exception as e:  # noqa: BLE001
                S.timing_failed(f"{case} kernel table", e)
    S.print_best("2:4 columns first: one kernel (gemm_sp + gemm) or two (gemm_sp, cuBLAS addmm), one CUDA graph",
                 rows, 28, 44)
    log("done")


def streams():
    """The two-kernel route with the dense part on a second stream of the same graph (the 2:4 kernel leaves SMs
    idle at N = 4096), and with a split-K 2:4 kernel (fp32 atomics, then one add), at 16 and 64 tokens."""
    tokens = [16, 64]

    def make(N, K, ks, M):
        bm, bn, bk, st, th, swz, pol = SP_TILES[M][0]
        out = [(("T", 1), spT_func(N, ks, K, M, bm, bn, bk, st, th, DTS, swz, pol))]
        return out + [(("K", split), spK_func(N, ks, K, M, bm, bn, bk, st, th, DTS, split))
                      for split in (2, 3) if (ks // bk) % split == 0]

    kernels, bench = start(sp_kernels(tokens, make))
    rows = []
    s2 = torch.cuda.Stream()

    def on_side(fn):
        cur = torch.cuda.current_stream()
        s2.wait_stream(cur)
        with torch.cuda.stream(s2):
            fn()
        return cur

    for L, ks, wt, bound, M, x, ref, case in cases(tokens, permuted=True):
        N, K = wt.shape
        wd, xd = L["wd"], x[:, ks:]
        dus = cublas_us(bench, x, wt, case, bound, rows)
        y = torch.empty(M, N, dtype=DT, device="cuda")
        y2 = torch.empty(M, N, dtype=DT, device="cuda")
        cf = torch.empty(N, M, dtype=torch.float32, device="cuda")
        variants = []
        for key, k in kernels.items():
            if key[:3] != (N, ks, M) or isinstance(k, BaseException):
                continue
            if key[3] == "T":
                def serial(k=k):
                    k(L["vals"], L["e16"], x, y)
                    y.addmm_(xd, wd.t())

                def two_streams(k=k):
                    cur = on_side(lambda: torch.mm(xd, wd.t(), out=y2))
                    k(L["vals"], L["e16"], x, y)
                    cur.wait_stream(s2)
                    y.add_(y2)

                variants += [("2 kernels", serial), ("2 streams", two_streams)]
            else:
                def splitk(k=k):
                    cf.zero_()
                    k(L["vals"], L["e16"], x, cf)
                    y.copy_(cf.t())
                    y.addmm_(xd, wd.t())

                def splitk_streams(k=k):
                    cur = on_side(lambda: torch.mm(xd, wd.t(), out=y2))
                    cf.zero_()
                    k(L["vals"], L["e16"], x, cf)
                    cur.wait_stream(s2)
                    torch.add(cf.t(), y2, out=y)

                variants += [(f"split-K {key[4]}", splitk), (f"split-K {key[4]}, 2 streams", splitk_streams)]
        time_variants(bench, case, variants, y, ref, dus, bound, rows)
    S.print_best("2:4 columns first, the dense part on a second stream and/or a split-K 2:4 kernel, one CUDA graph",
                 rows, 28, 44)
    log("done")


def selftest():
    """On the CPU: the split covers every column once, and the two parts rebuild ``x @ w^T``."""
    for N, K, frac in ((256, 1024, 0.5), (128, 1408, 0.9)):
        L = layer(N, K, frac, torch.float64, 3, "cpu")
        assert torch.equal(torch.cat([L["sp_idx"], L["dn_idx"]]).sort().values, torch.arange(K))
        assert L["sp_idx"].numel() % 256 == 0
        x = torch.randn(5, K, dtype=torch.float64)
        w24 = S.unpack24(L["vals"], L["e16"].view(torch.uint8), L["sp_idx"].numel())
        y = x[:, L["sp_idx"]] @ w24.t() + x[:, L["dn_idx"]] @ L["wd"].t()
        assert torch.allclose(y, x @ L["w"].t())
    print("selftest passed")


if __name__ == "__main__":
    selftest() if "--selftest" in sys.argv else fused() if "--fused" in sys.argv else \
        streams() if "--streams" in sys.argv else main()
