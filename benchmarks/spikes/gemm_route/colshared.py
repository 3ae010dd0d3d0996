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
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spike as S  # noqa: E402
import sweep as S_sweep  # noqa: E402

log, one_line, TILE, SHAPES = S.log, S.one_line, S.TILE, S.SHAPES  # (importing sweep set the budget)
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


def main():
    import tilelang

    p = torch.cuda.get_device_properties(0)
    log(f"device {p.name} SMs={p.multi_processor_count} torch {torch.__version__} tilelang {tilelang.__version__}")
    dt, dts = torch.bfloat16, "bfloat16"
    built = []
    for N, K in SHAPES:
        for frac in FRACS:
            ks = split_columns(K, frac, 0)[0].numel()
            for M in TOKENS:
                for cfg in SP_TILES[M]:
                    bm, bn, bk, st, th, swz, pol = cfg
                    if ks % bk:
                        continue
                    built.append(((N, ks, M, cfg), S_sweep.sp_func(N, ks, M, bm, bn, bk, st, th, dts, swz, pol),
                                  {"pc": "ws"}))
    built = list({k: (k, f, o) for k, f, o in built}.values())  # (both fractions may give one 2:4 width)
    t = time.time()
    kernels = S.compile_tl(built)
    log(f"compiled {sum(not isinstance(v, BaseException) for v in kernels.values())}/{len(built)} in "
        f"{time.time() - t:.1f}s")
    bench = S.Bench()
    rows = []
    for N, K in SHAPES:
        for frac in FRACS:
            L = layer(N, K, frac, dt, 11 + N)
            ks = L["sp_idx"].numel()
            f_real = ks / K
            bound = 1 / (1 - 0.4375 * f_real)
            for M in TOKENS:
                if S.time_left() < 10:
                    log(f"budget: skip {N}x{K} f={frac} M={M}")
                    continue
                gen = torch.Generator(device="cuda")
                gen.manual_seed(M)
                x = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.float32).to(dt)
                ref = x.double() @ L["w"].double().t()
                y0 = torch.empty(M, N, dtype=dt, device="cuda")
                torch.mm(x, L["w"].t(), out=y0)  # (F.linear without bias: the same cuBLAS call)
                g0 = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g0):
                    torch.mm(x, L["w"].t(), out=y0)
                dus = bench.us(g0.replay)  # (in a CUDA graph too)
                case = f"{N}x{K} f={f_real:.2f} M={M}"
                log(f"{case} cuBLAS {dus:.1f} us, bound {bound:.2f}x")
                rows.append((case, "cuBLAS", dus, dus, 0.0))
                xs = torch.empty(M, ks, dtype=dt, device="cuda")
                xd = torch.empty(M, K - ks, dtype=dt, device="cuda")
                c = torch.empty(N, M, dtype=dt, device="cuda")
                y = torch.empty(M, N, dtype=dt, device="cuda")

                def rest():
                    c.addmm_(L["wd"], xd.t())
                    y.copy_(c.t())

                variants = []
                for (kN, kK, kM, cfg), k in kernels.items():
                    if (kN, kK, kM) != (N, ks, M) or isinstance(k, BaseException):
                        continue

                    def run(k=k):
                        torch.index_select(x, 1, L["sp_idx"], out=xs)
                        torch.index_select(x, 1, L["dn_idx"], out=xd)
                        k(L["vals"], L["e16"], xs, c)
                        rest()

                    variants.append((f"gemm_sp bm{cfg[0]} bn{cfg[1]} bk{cfg[2]} st{cfg[3]} th{cfg[4]}", run))
                if M >= 256:
                    try:
                        wc = torch._cslt_compress(L["w24"])
                        alg = int(torch._cslt_sparse_mm_search(wc, xs.t()))

                        def run_cslt(wc=wc, alg=alg):
                            torch.index_select(x, 1, L["sp_idx"], out=xs)
                            torch.index_select(x, 1, L["dn_idx"], out=xd)
                            c.copy_(torch._cslt_sparse_mm(wc, xs.t(), alg_id=alg))
                            rest()

                        variants.append((f"cuSPARSELt alg{alg}", run_cslt))
                    except Exception as e:  # noqa: BLE001
                        log(f"{case} cuSPARSELt: {one_line(e)[:160]}")
                for label, run in variants:
                    if S.time_left() < 8:
                        break
                    try:
                        run()
                        err = S.rel_err(y, ref)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            run()
                        us = bench.us(g.replay)
                        rows.append((case, label, dus, us, err))
                        log(f"{case} {label}: {us:.1f} us  {dus / us:.2f}x ({dus / us / bound:.0%} of bound)  "
                            f"err {err:.1e}")
                    except Exception as e:  # noqa: BLE001
                        S.timing_failed(f"{case} {label}", e)
    S.print_best("the gathers, both GEMMs and the transpose, one CUDA graph", rows, 28, 44)
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
    selftest() if "--selftest" in sys.argv else main()
