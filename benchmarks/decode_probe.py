"""Decode probe (v6 groundwork): how fast can a *streaming* Triton GEMV read a plain weight on this GPU?

Plain layouts only (no tile map): dense ``W [N, K]`` and all-2:4 ``vals [N, K/2]`` + ``meta [N, K/8]``
(4-bit codes ``p0 | p1 << 2``, the packed format's own encoding). Every kernel is one long-lived program per
``BN`` rows (times ``SPLIT`` K ranges) that loops over K in chunks of ``BK`` positions, optionally with the
next chunk's loads issued before the current chunk is used (``PREF``). The question it answers: which
structure, if any, reaches cuBLAS's bandwidth on dense rows and ~1.6x dense on 2:4 rows; the hybrid kernel
is then built on the winner.

    PYTHONPATH=src python3 benchmarks/decode_probe.py --check       # small shapes (also CPU + TRITON_INTERPRET=1)
    PYTHONPATH=src python3 benchmarks/decode_probe.py --out probe.md   # timings (GPU)
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import torch
import triton
import triton.language as tl

from tilesparse.kernels.triton_hybrid import _expand24, _nibbles, _pick_x, _pos_planes, _x_planes
from tilesparse.kernels.triton_stream import _dot_acc


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load24(vals, meta, x_ptr, r64, row_ok, c, KH, KM, K, offs_m, m_ok, BK: tl.constexpr):
    j = tl.arange(0, BK // 2)
    v = tl.load(vals + r64[:, None] * KH + (c * (BK // 2) + j)[None, :], mask=row_ok[:, None], other=0.0)
    jm = tl.arange(0, BK // 8)
    mb = tl.load(meta + r64[:, None] * KM + (c * (BK // 8) + jm)[None, :], mask=row_ok[:, None], other=0)
    k = c * BK + tl.arange(0, BK)
    xc = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None], other=0.0)
    return v, mb, xc


@triton.jit
def _load24p(vals32, meta, x_ptr, x32_ptr, r64, row_ok, c, KH, KM, K, offs_m, m_ok, BK: tl.constexpr,
             XPAIRS: tl.constexpr):
    """As _load24 with the values as int32 pairs [BN, BK/4] (and x as int32 pairs [BK/2] if XPAIRS)."""
    j = tl.arange(0, BK // 4)
    v = tl.load(vals32 + r64[:, None] * (KH // 2) + (c * (BK // 4) + j)[None, :], mask=row_ok[:, None], other=0)
    jm = tl.arange(0, BK // 8)
    mb = tl.load(meta + r64[:, None] * KM + (c * (BK // 8) + jm)[None, :], mask=row_ok[:, None], other=0)
    if XPAIRS:
        xc = tl.load(x32_ptr + c * (BK // 2) + tl.arange(0, BK // 2))
    else:
        k = c * BK + tl.arange(0, BK)
        xc = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None], other=0.0)
    return v, mb, xc


@triton.jit
def _loadd(w_ptr, x_ptr, r64, row_ok, c, K, offs_m, m_ok, BK: tl.constexpr):
    k = c * BK + tl.arange(0, BK)
    w = tl.load(w_ptr + r64[:, None] * K + k[None, :], mask=row_ok[:, None], other=0.0)
    xc = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None], other=0.0)
    return w, xc


@triton.jit
def _load_chunk(vals, vals32, meta, w_ptr, x_ptr, x32_ptr, r64, row_ok, c, KH, KM, K, offs_m, m_ok,
                BK: tl.constexpr, KIND: tl.constexpr, SP: tl.constexpr, PAIRS: tl.constexpr):
    """Chunk ``c`` of the layout the kernel reads: (values, metadata, x) for 2:4, (w, w, x) for dense."""
    if PAIRS:
        a, b, xc = _load24p(vals32, meta, x_ptr, x32_ptr, r64, row_ok, c, KH, KM, K, offs_m, m_ok, BK, KIND == 6)
    elif SP:
        a, b, xc = _load24(vals, meta, x_ptr, r64, row_ok, c, KH, KM, K, offs_m, m_ok, BK)
    else:
        a, xc = _loadd(w_ptr, x_ptr, r64, row_ok, c, K, offs_m, m_ok, BK)
        b = a
    return a, b, xc


@triton.jit
def _fma24(acc, v, mb, xc, BN: tl.constexpr, BK: tl.constexpr):
    """acc[BN, G] += v0 * x[4g + p0] + v1 * x[4g + p1] (one token; x selected per row by tl.where)."""
    G: tl.constexpr = BK // 4
    v0, v1 = tl.split(tl.reshape(v, (BN, G, 2)))
    nib = _nibbles(mb, BN, G)
    x0, x1, x2, x3 = _x_planes(xc.to(tl.float32), 1, G)
    xs0, xs1 = _pick_x(nib & 3, nib >> 2, x0, x1, x2, x3)
    return acc + v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1


def selector_tables(device):
    """Per 4-bit code ``p0 | p1 << 2``: (a) int64 = two ``prmt`` selectors that expand a group's value pair
    (v0 | v1 << 16) into its dense halfwords 0,1 (low word) and 2,3 (high word), zero bytes elsewhere;
    (b) int32 ``prmt`` selector that picks (x[p0], x[p1]) out of the group's four 16-bit x."""
    exp, xs = [0] * 16, [0] * 16
    for p0 in range(4):
        for p1 in range(p0 + 1, 4):
            hw = []
            for q in range(4):
                hw.append(0x10 if q == p0 else 0x32 if q == p1 else 0x44)
            lo, hi = hw[0] | hw[1] << 8, hw[2] | hw[3] << 8
            exp[p0 | p1 << 2] = lo | hi << 32
            xs[p0 | p1 << 2] = (2 * p0) | (2 * p0 + 1) << 4 | (2 * p1) << 8 | (2 * p1 + 1) << 12
    return (torch.tensor(exp, dtype=torch.int64, device=device), torch.tensor(xs, dtype=torch.int32, device=device))


@triton.jit
def _expand_asm(v32, sel):
    """(value pair, int64 selector pair) -> the group's four dense bf16 (d0, d1, d2, d3)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 slo, shi, w01, w23, z;
        mov.b32 z, 0;
        mov.b64 {slo, shi}, $5;
        prmt.b32 w01, $4, z, slo;
        prmt.b32 w23, $4, z, shi;
        mov.b32 {$0, $1}, w01;
        mov.b32 {$2, $3}, w23;
        }""",
        "=h,=h,=h,=h,r,l", [v32, sel], dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=1)


@triton.jit
def _xsel_fma_asm(acc, v32, sel, xa, xb):
    """acc + v.lo * x[p0] + v.hi * x[p1] (bf16 pairs; ``sel`` picks (x[p0], x[p1]) from xa | xb)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 q, x0, x1, v0, v1;
        prmt.b32 q, $3, $4, $2;
        shl.b32 x0, q, 16;
        and.b32 x1, q, -65536;
        shl.b32 v0, $1, 16;
        and.b32 v1, $1, -65536;
        fma.rn.f32 $0, v0, x0, $5;
        fma.rn.f32 $0, v1, x1, $0;
        }""",
        "=r,r,r,r,r,r", [v32, sel, xa, xb, acc], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _step(acc, a, b, xc, tab64, tab32, KIND: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          F32: tl.constexpr):
    """One chunk. KIND 0: dense FMA (M=1), 1: 2:4 FMA (M=1), 2: dense dot, 3: 2:4 expand + dot."""
    if KIND == 0:
        acc += a.to(tl.float32) * tl.reshape(xc.to(tl.float32), (BK,))[None, :]
    elif KIND == 1:
        acc = _fma24(acc, a, b, xc, BN, BK)
    elif KIND == 5:  # planes from a table-driven prmt expansion (a = int32 value pairs [BN, G])
        G: tl.constexpr = BK // 4
        d0, d1, d2, d3 = _expand_asm(a, tl.load(tab64 + _nibbles(b, BN, G)))
        x0, x1, x2, x3 = _x_planes(xc, xc.shape[0], G)
        acc = _dot_acc(acc, d0, x0, F32)
        acc = _dot_acc(acc, d1, x1, F32)
        acc = _dot_acc(acc, d2, x2, F32)
        acc = _dot_acc(acc, d3, x3, F32)
    elif KIND == 6:  # one token, x pair picked by a table-driven prmt (a = int32 pairs, xc = x as int32 pairs)
        G: tl.constexpr = BK // 4
        sel = tl.load(tab32 + _nibbles(b, BN, G))
        xa, xb = tl.split(tl.reshape(xc, (G, 2)))
        acc = _xsel_fma_asm(acc, a, sel, xa[None, :], xb[None, :])
    elif KIND == 4:  # 2:4 as four planes: acc += sum_q D_q @ X_q^T, D_q[n, g] = weight at 4g + q
        G: tl.constexpr = BK // 4
        v0, v1 = tl.split(tl.reshape(a, (BN, G, 2)))
        nib = _nibbles(b, BN, G)
        d0, d1, d2, d3 = _pos_planes(v0, v1, nib & 3, nib >> 2)
        x0, x1, x2, x3 = _x_planes(xc, xc.shape[0], G)
        acc = _dot_acc(acc, d0, x0, F32)
        acc = _dot_acc(acc, d1, x1, F32)
        acc = _dot_acc(acc, d2, x2, F32)
        acc = _dot_acc(acc, d3, x3, F32)
    else:
        w = a if KIND == 2 else _expand24(a, _nibbles(b, BN, BK // 4), BN, BK)
        acc = _dot_acc(acc, w, xc, F32)
    return acc


@triton.jit
def probe_kernel(x_ptr, x32_ptr, w_ptr, vals, vals32, meta, tab64, tab32, out_ptr, ws_ptr, M, N, K, KH, KM,
                 KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 SPLIT: tl.constexpr, PREF: tl.constexpr, F32: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    offs_m = tl.arange(0, BM)
    m_ok = offs_m < M
    nch = K // BK
    per = tl.cdiv(nch, SPLIT)
    c0 = s * per
    c1 = tl.minimum(c0 + per, nch)
    SP: tl.constexpr = KIND == 1 or KIND >= 3
    PAIRS: tl.constexpr = KIND >= 5
    FMA: tl.constexpr = KIND <= 1 or KIND == 6
    if FMA:
        acc = tl.zeros((BN, BK // 4 if SP else BK), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    if PREF:
        a, b, xc = _load_chunk(vals, vals32, meta, w_ptr, x_ptr, x32_ptr, r64, row_ok, c0, KH, KM, K, offs_m, m_ok,
                               BK, KIND, SP, PAIRS)
        for c in range(c0 + 1, c1):
            an, bn_, xn = _load_chunk(vals, vals32, meta, w_ptr, x_ptr, x32_ptr, r64, row_ok, c, KH, KM, K, offs_m,
                                      m_ok, BK, KIND, SP, PAIRS)
            acc = _step(acc, a, b, xc, tab64, tab32, KIND, BN, BK, F32)
            a, b, xc = an, bn_, xn
        if c0 < c1:
            acc = _step(acc, a, b, xc, tab64, tab32, KIND, BN, BK, F32)
    else:
        for c in range(c0, c1):
            a, b, xc = _load_chunk(vals, vals32, meta, w_ptr, x_ptr, x32_ptr, r64, row_ok, c, KH, KM, K, offs_m, m_ok,
                                   BK, KIND, SP, PAIRS)
            acc = _step(acc, a, b, xc, tab64, tab32, KIND, BN, BK, F32)
    if FMA:
        y = tl.sum(acc, 1)[None, :]  # [1, BN]
    else:
        y = tl.trans(acc)  # [BM, BN]
    ok = m_ok[:, None] & row_ok[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + offs_m[:, None] * N + rows[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(ws_ptr + offs_m[:, None] * N + rows[None, :], y, mask=ok, sem="relaxed")


KINDS = {0: "dense-fma", 1: "24-fma", 2: "dense-dot", 3: "24-dot", 4: "24-planes", 5: "24-planes-asm",
         6: "24-fma-asm"}
_TABS: dict = {}


def run(kind, bm, bn, bk, split, pref, warps, x, W, vals, meta, out, ws):
    M, K = x.shape
    N = out.shape[1]
    if str(x.device) not in _TABS:
        _TABS[str(x.device)] = selector_tables(x.device)
    tab64, tab32 = _TABS[str(x.device)]
    probe_kernel[(triton.cdiv(N, bn), split)](
        x, x.view(torch.int32), W, vals, vals.view(torch.int32), meta, tab64, tab32, out, ws, M, N, K, K // 2, K // 8,
        KIND=kind, BM=bm, BN=bn, BK=bk, SPLIT=split, PREF=pref, F32=not x.is_cuda, num_warps=warps, num_stages=1)


# ---------------------------------------------------------------------------------------------- data
def pack24(W: torch.Tensor):
    """Keep the 2 largest |w| of every group of 4: (vals [N, K/2], meta [N, K/8] uint8, masked W)."""
    N, K = W.shape
    g = W.reshape(N, K // 4, 4)
    top = g.abs().float().topk(2, dim=-1).indices.sort(dim=-1).values  # [N, G, 2], p0 < p1
    vals = torch.gather(g, 2, top).reshape(N, K // 2).contiguous()
    code = (top[..., 0] | (top[..., 1] << 2)).to(torch.int32)
    meta = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).contiguous()
    masked = torch.zeros_like(g).scatter_(2, top, torch.gather(g, 2, top)).reshape(N, K)
    return vals, meta, masked


def variants(M: int, quick: bool, kinds=None):
    """(kind, bm, bn, bk, split, pref, warps) to try for M tokens (only ``kinds`` if given)."""
    out = []
    if M == 1:
        for kind in (0, 1):
            for bn, bk, w, pref in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (0, 1)):
                if kind == 0 and bk == 1024:
                    continue
                out.append((kind, 1, bn, bk, 1, pref, w))
        for kind, bn, bk, w in ((0, 8, 512, 4), (1, 8, 512, 4), (1, 16, 512, 4), (1, 8, 1024, 8)):
            out.append((kind, 1, bn, bk, 2, 1, w))
        for bn, bk, w, pref in itertools.product((8, 16), (256, 512, 1024), (4, 8), (0, 1)):
            out.append((6, 1, bn, bk, 1, pref, w))
    else:
        bm = max(16, 1 << math.ceil(math.log2(M)))
        for kind in (2, 3, 4):
            for bn, bk, w, pref, split in itertools.product((32, 64), (128, 256), (4, 8), (0, 1), (1, 4)):
                if kind == 4 and bk == 128:
                    continue  # planes of 32 columns: K=32 dots
                out.append((kind, bm, bn, bk, split, pref, w))
        for bn, bk, w, pref, split in itertools.product((32, 64), (128, 256), (4, 8), (0, 1), (1, 4)):
            out.append((5, bm, bn, bk, split, pref, w))
    if quick:
        out = out[::7] + [v for v in out if v[4] > 1][:2]
    return [v for v in out if kinds is None or v[0] in kinds]


# ---------------------------------------------------------------------------------------------- modes
def check(args) -> bool:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    worst, n, ok = 0.0, 0, True
    for (N, K), M in ((256, 2048), 1), ((128, 1024), 3), ((256, 2048), 16):
        W = (torch.randn(N, K, device=dev) * 0.05).bfloat16()
        vals, meta, masked = pack24(W)
        x = torch.randn(M, K, device=dev).bfloat16()
        gpu_only = () if dev == "cuda" else (5, 6)  # inline PTX
        for v in variants(M, args.quick or dev == "cpu", [k for k in args.kinds if k not in gpu_only]):
            kind, bm, bn, bk, split, pref, w = v
            if bk > K or (K // bk) < split:
                continue
            out = torch.zeros(M, N, device=dev, dtype=torch.bfloat16)
            ws = torch.zeros(M, N, device=dev, dtype=torch.float32)
            run(kind, bm, bn, bk, split, pref, w, x, W, vals, meta, out, ws)
            y = (ws if split > 1 else out).double()
            ref = x.double() @ (masked if kind in (1, 3, 4, 5, 6) else W).double().T
            err = float((y - ref).norm() / ref.norm())
            worst, n = max(worst, err), n + 1
            if not err < 1e-2:
                ok = False
                print(f"FAIL {KINDS[kind]} {v}: rel err {err:.2e}")
    print(f"probe check: {n} runs, worst rel err {worst:.2e}, {'PASS' if ok else 'FAIL'}")
    return ok


def _median_us(fns, reps: int) -> float:
    """Median time of one call (us): a CUDA graph over ``fns`` (the layer table's timer)."""
    from kernel_speed import _median_ms  # benchmarks/kernel_speed.py, on sys.path as this script's folder

    return _median_ms(fns, True, reps) * 1e3


def bench(args) -> None:
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    lines = [f"# decode probe on {props.name}, {time.strftime('%Y-%m-%d')}; us per call, CUDA graph over weight "
             "copies > 4x L2, median", "",
             "| shape | M | dense F.linear | best dense-kernel (config) | x cuBLAS | best 2:4-kernel (config) | "
             "2:4 x dense | bytes bound | % of bound |", "|---|---|---|---|---|---|---|---|---|"]
    for sname in args.shapes.split(","):
        N, K = (int(v) for v in sname.split("x"))
        copies = max(2, math.ceil(4 * l2 / (N * K * 2)))
        Ws = [(torch.randn(N, K, device=dev) * 0.02).bfloat16() for _ in range(copies)]
        packs = [pack24(W)[:2] for W in Ws]
        for M in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(M, K, device=dev).bfloat16()
            out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
            ws = torch.zeros(M, N, device=dev, dtype=torch.float32)
            t_dense = _median_us([lambda W=W: torch.nn.functional.linear(x, W) for W in Ws], args.reps)
            t_zero = _median_us([lambda: ws.zero_()], args.reps)
            res = {}
            for v in variants(M, False, args.kinds):
                kind, bm, bn, bk, split, pref, w = v
                if K % bk or (K // bk) < split:
                    continue

                def fn(W, vp, v=v):
                    if v[4] > 1:
                        ws.zero_()
                    run(v[0], v[1], v[2], v[3], v[4], v[5], v[6], x, W, vp[0], vp[1], out, ws)
                try:
                    t = _median_us([lambda W=W, vp=vp: fn(W, vp) for W, vp in zip(Ws, packs)], args.reps)
                except Exception as e:  # noqa: BLE001
                    print(f"  skip {v}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                    continue
                res[v] = t
                print(f"  {sname} M={M} {KINDS[kind]} bn{bn} bk{bk} s{split} p{pref} w{w}: {t:.1f} us", flush=True)
            dk = {v: t for v, t in res.items() if v[0] in (0, 2)} or {(0, 0, 0, 0, 0, 0, 0): float("nan")}
            sk = {v: t for v, t in res.items() if v[0] in (1, 3, 4, 5, 6)} or {(1, 0, 0, 0, 0, 0, 0): float("nan")}
            bd, bs = min(dk, key=dk.get), min(sk, key=sk.get)

            def name(v):
                return f"{KINDS[v[0]]} bn{v[2]} bk{v[3]} s{v[4]} p{v[5]} w{v[6]}"
            bound = 1 / (1 - 0.4375)
            lines.append(f"| {sname} | {M} | {t_dense:.1f} | {dk[bd]:.1f} ({name(bd)}) | {t_dense / dk[bd]:.2f} | "
                         f"{sk[bs]:.1f} ({name(bs)}) | {t_dense / sk[bs]:.2f} | {bound:.2f} | "
                         f"{t_dense / sk[bs] / bound * 100:.0f}% |")
            print(f"  (zeroing the split-K workspace alone: {t_zero:.1f} us)", flush=True)
        del Ws, packs
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


def _precompile_worker(job):
    w, n, tokens, kinds = job
    dev = "cuda"
    W = (torch.randn(256, 2048, device=dev) * 0.02).bfloat16()
    vals, meta, _ = pack24(W)
    done = 0
    for M in tokens:
        x = torch.randn(M, 2048, device=dev).bfloat16()
        out = torch.empty(M, 256, device=dev, dtype=torch.bfloat16)
        ws = torch.zeros(M, 256, device=dev, dtype=torch.float32)
        for i, v in enumerate(variants(M, False, kinds)):
            if i % n == w:
                try:
                    run(*v, x, W, vals, meta, out, ws)
                    done += 1
                except Exception as e:  # noqa: BLE001
                    print(f"  precompile skip {v}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
    torch.cuda.synchronize()
    return done


def precompile(tokens, workers: int, kinds) -> None:
    """Fill Triton's on-disk cache for every variant in ``workers`` processes."""
    import concurrent.futures as cf
    import multiprocessing as mp
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        n = sum(ex.map(_precompile_worker, [(w, workers, tokens, kinds) for w in range(workers)]))
    print(f"precompiled {n} variants in {time.time() - t0:.0f}s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--precompile", type=int, default=0, metavar="WORKERS")
    ap.add_argument("--kinds", default="0,1,2,3,4,5,6", help="kernel kinds to run (see KINDS)")
    args = ap.parse_args()
    args.kinds = [int(k) for k in args.kinds.split(",")]
    if args.precompile and torch.cuda.is_available():
        precompile([int(t) for t in args.tokens.split(",")], args.precompile, args.kinds)
    if args.check or not torch.cuda.is_available():
        return 0 if check(args) else 1
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
