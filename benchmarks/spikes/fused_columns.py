"""Can TileLang run a column-shared layer as ONE kernel (2:4 steps and dense steps into one accumulator)?

Lowers, on the CPU for sm_90a, two ways to write the fused kernel and reports what TileLang made of each:

* ``loops``: a pipelined loop over the 2:4 tile-columns, then one over the dense tile-columns;
* ``branch``: one pipelined loop over both, the kind chosen per step by a branch.

    PYTHONPATH=src python3 benchmarks/spikes/fused_columns.py

Found with TileLang 0.1.15: ``loops`` warp-specializes the first loop only (TMA, a producer warp group) and
pipelines the second with ``cp.async`` in the consumer threads, whose epilogue then fails to lower when the step
count is a run-time value (a descriptor offset must be a constant); ``branch`` lowers, but without TMA or warp
specialization (element loads, 128 threads). So the library keeps two kernels per layer (one program, see
``tilelang_columns.pair_func``).
"""

# (no "from __future__ import annotations": TileLang evaluates the kernel's annotations at definition)

import traceback


def fused(form: str, tw=128, rows=64, toks=16, stages=4, threads=128, dtype="bfloat16"):
    import tilelang.language as T
    from tilelang.language import GemmWarpPolicy as P

    m, n, k, h, he, kd = T.dynamic("m, n, k, h, he, kd")
    nsp, ndn = T.dynamic("nsp, ndn")
    pol = P.FullRow

    @T.macro
    def sparse_step(Ws, E, TCs, X, A0, E0, B0, C_l, bx, by, s):
        T.copy(Ws[by * rows, s * (tw // 2)], A0)
        T.copy(E[by * rows, s * (tw // 16)], E0)
        T.copy(X[bx * toks, TCs[s] * tw], B0)
        T.gemm_sp(A0, E0, B0, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)

    @T.macro
    def dense_step(W, TCd, X, A_d, B_d, C_l, bx, by, s):
        T.copy(W[by * rows, s * tw], A_d)
        T.copy(X[bx * toks, TCd[s] * tw], B_d)
        T.gemm(A_d, B_d, C_l, transpose_A=False, transpose_B=True, policy=pol)

    @T.prim_func
    def main(Ws: T.Tensor((n, h), dtype), E: T.Tensor((n, he), "int16"), TCs: T.Tensor((nsp,), "int32"),
             W: T.Tensor((n, kd), dtype), TCd: T.Tensor((ndn,), "int32"), X: T.Tensor((m, k), dtype),
             Y: T.Tensor((m, n), dtype)):
        with T.Kernel(T.ceildiv(m, toks), T.ceildiv(n, rows), threads=threads) as (bx, by):
            A0 = T.alloc_shared((rows, tw // 2), dtype)
            E0 = T.alloc_shared((rows, tw // 16), "int16")
            B0 = T.alloc_shared((toks, tw), dtype)
            A_d = T.alloc_shared((rows, tw), dtype)
            B_d = T.alloc_shared((toks, tw), dtype)
            C_l = T.alloc_fragment((rows, toks), "float32")
            T.clear(C_l)
            if form == "loops":
                for s in T.Pipelined(nsp, num_stages=stages):
                    sparse_step(Ws, E, TCs, X, A0, E0, B0, C_l, bx, by, s)
                for s in T.Pipelined(ndn, num_stages=stages):
                    dense_step(W, TCd, X, A_d, B_d, C_l, bx, by, s)
            else:
                for s in T.Pipelined(nsp + ndn, num_stages=stages):
                    if s < nsp:
                        sparse_step(Ws, E, TCs, X, A0, E0, B0, C_l, bx, by, s)
                    else:
                        dense_step(W, TCd, X, A_d, B_d, C_l, bx, by, s - nsp)
            for i, j in T.Parallel(rows, toks):
                if bx * toks + j < m:
                    Y[bx * toks + j, by * rows + i] = C_l[i, j]

    return main


def main() -> int:
    import tilelang
    from tvm.target import Target

    target = Target({"kind": "cuda", "arch": "sm_90a"})
    print(f"TileLang {tilelang.__version__}, sm_90a, 16 tokens x 64 rows, tile width 128, 4 stages")
    print("| form | lowered | TMA copies | producer warp group | element loads of x or weights |")
    print("|---|---|---|---|---|")
    for form in ("loops", "branch"):
        try:
            with target:
                src = tilelang.lower(fused(form), target=target).kernel_source
        except Exception as e:  # noqa: BLE001 - the finding is the failure
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            print(f"| {form} | no: {last[:100]} | | | |")
            continue
        print(f"| {form} | yes | {src.count('tma_load(')} | {'yes' if '__launch_bounds__(256' in src else 'no'} | "
              f"{'yes' if 'X[' in src or 'Ws[' in src else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
