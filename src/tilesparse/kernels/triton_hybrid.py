"""Triton kernels for the packed hybrid format: ``Y = X @ W^T (+ bias)`` and on-device unpacking.

One kernel, three accumulation modes chosen per call (constexpr ``MODE``):

* ``MODE_FMA`` (decode, 1-4 tokens): expanded weights times ``x`` accumulated element-wise in fp32
  registers over the whole K loop, one reduction at the end (no tensor cores, no shuffles per step).
* ``MODE_SWAP`` (decode, up to ~64 tokens): ``acc[BN, BM] += W[BN, BK] @ X^T[BK, BM]`` on tensor
  cores; the weight rows fill the MMA's large dimension, the few tokens its small one.
* ``MODE_GATHER`` (decode, 1-4 tokens): like ``MODE_FMA`` but 2:4 tiles are never expanded: each
  kept value multiplies ``x`` at its position (``x`` selected per group with the 2-bit positions).
* ``MODE_MM`` (prefill): ``acc[BM, BN] += X[BM, BK] @ W^T[BK, BN]``.

A program owns ``BN`` rows of one tile-row and streams that tile-row's 2:4 K-space (compressed values
+ 4-bit metadata expanded in registers with a few shifts/masks/selects) and then its dense K-space
into one fp32 accumulator. ``LSTAGES`` (``tl.range(num_stages=...)`` on the K loops) makes Triton's
software pipeliner stage *every* load of the loop (values, metadata, x) through a cp.async ring, not only
those feeding a ``tl.dot`` -- more bytes in flight per SM for the decode modes; ``UNROLL`` unrolls the
K loops. ``None`` for both keeps the compiler's default (on the H100 neither knob makes any decode config
faster: the ring adds a shared-memory round trip and lowers occupancy, so the autotuner leaves them at
``None``). All-zero tiles are never visited. ``SPLIT > 1`` splits both K-spaces over
``SPLIT`` programs; partial sums go to an fp32 workspace and the last program to arrive (an atomic
counter per output block, reset by that program) adds them up -- one launch, no memset.

``hybrid_flat_kernel`` (decode up to 16 tokens, opt-in) and its persistent variant are described above their code
(end of this module).

Pointer-alignment facts the format guarantees (row strides and block offsets multiples of 8 values /
16 metadata bytes) are passed to the compiler with ``tl.multiple_of`` so loads are 16 bytes wide.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_FMA = 0
MODE_SWAP = 1
MODE_MM = 2
MODE_GATHER = 3


@triton.jit
def _nibbles(mb, BN: tl.constexpr, G: tl.constexpr):
    """Metadata bytes ``[BN, G/2]`` -> per-group codes ``p0 | p1 << 2`` ``[BN, G]`` (int32; low nibble = even
    group)."""
    mb = mb.to(tl.int32)
    return tl.reshape(tl.join(mb & 15, mb >> 4), (BN, G))


@triton.jit
def _pos_planes(v0, v1, p0, p1):
    """A group's kept values (``v0`` at position ``p0``, ``v1`` at ``p1``) -> its weights at positions 0..3
    (zero where pruned)."""
    zero = tl.zeros_like(v0)
    d0 = tl.where(p0 == 0, v0, zero)
    d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
    d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
    d3 = tl.where(p1 == 3, v1, zero)
    return d0, d1, d2, d3


@triton.jit
def _x_planes(x, BM: tl.constexpr, G: tl.constexpr):
    """x ``[BM, 4G]`` -> its four position planes ``x[:, 4g + q]``, q = 0..3, each ``[BM, G]``."""
    xe, xo = tl.split(tl.reshape(x, (BM, G, 2, 2)))  # xe[g, i] = x[4g + 2i], xo[g, i] = x[4g + 2i + 1]
    x0, x2 = tl.split(xe)
    x1, x3 = tl.split(xo)
    return x0, x1, x2, x3


@triton.jit
def _pick_x(p0, p1, x0, x1, x2, x3):
    """(x[p0], x[p1]) of a group from its four x values (p0 in 0..2, p1 in 1..3)."""
    xs0 = tl.where(p0 == 0, x0, tl.where(p0 == 1, x1, x2))
    xs1 = tl.where(p1 == 3, x3, tl.where(p1 == 2, x2, x1))
    return xs0, xs1


@triton.jit
def _expand24(v, nib, BN: tl.constexpr, BK: tl.constexpr):
    """Compressed values ``v[BN, BK/2]`` + group codes ``nib[BN, BK/4]`` (int32) -> dense ``[BN, BK]``."""
    v0, v1 = tl.split(tl.reshape(v, (BN, BK // 4, 2)))
    d0, d1, d2, d3 = _pos_planes(v0, v1, nib & 3, nib >> 2)
    # [BN, G, j, i] = d_{2j+i}  ->  flattened position 4g + 2j + i
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BN, BK))


@triton.jit
def _load_nibbles(t_rows, t16_rows, kk, row_ok, mt_stride, BN: tl.constexpr, BK: tl.constexpr,
                  META16: tl.constexpr):
    """4-bit group codes ``[BN, BK/4]`` (int32) of the chunk starting at sparse position ``kk``."""
    if META16:  # one 16-bit word per 4 groups, broadcast + shift (no join/reshape of loaded data)
        kw = kk // 16 + tl.arange(0, BK // 16)
        wd = tl.load(t16_rows + kw[None, :], mask=row_ok[:, None] & (kw[None, :] * 2 < mt_stride), other=0)
        wd = wd.to(tl.int32) & 0xFFFF
        sh = (tl.arange(0, 4) * 4)[None, None, :]
        nib = tl.reshape((wd[:, :, None] >> sh) & 15, (BN, BK // 4))
    else:
        kt = kk // 8 + tl.arange(0, BK // 8)
        mt = tl.load(t_rows + kt[None, :], mask=row_ok[:, None] & (kt[None, :] < mt_stride), other=0)
        nib = _nibbles(mt, BN, BK // 4)
    return nib


@triton.jit
def _gather_fma(acc, v, nib, x_ptr, offs_m, m_ok, xk, k_ok, stride_xm, stride_xk,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc[BM, BN, BK/4] += v0 * x[4g + p0] + v1 * x[4g + p1] (the compressed values are never expanded)."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :] * stride_xk,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    return _gather_acc(acc, v, nib, x, BM, BN, BK)


@triton.jit
def _accumulate(acc, w, x_ptr, offs_m, m_ok, xk, k_ok, stride_xm, stride_xk, MODE: tl.constexpr,
                DOT_F32: tl.constexpr):
    if MODE == 0 or MODE == 3:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    elif MODE == 1:
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + xk[:, None] * stride_xk,
                     mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_F32:  # only for the CPU interpreter, whose bf16 tl.dot is broken
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        else:
            acc = tl.dot(w, xt, acc)
    else:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _write_output(y, out_ptr, bias_ptr, ws_ptr, lock, offs_m, m_ok, rows, row_ok, s, M, N, stride_om,
                  SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store ``y [BM, BN]`` (fp32 partial sums over this program's K range) as the output block (+ bias).
    ``SPLIT > 1``: the program stores ``y`` in its own slice ``s`` of the fp32 workspace ``[SPLIT, M, N]``
    (plain stores, SPLIT*M*N < 2**31: split only for few tokens) and counts its arrival at ``lock``; the last of
    the ``SPLIT`` programs to arrive adds the slices, writes the output and resets ``lock`` (one launch)."""
    out_mask = m_ok[:, None] & row_ok[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + rows[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws = ws_ptr + offs_m[:, None].to(tl.int64) * N + rows[None, :]
        MN = N * M
        tl.store(ws + s * MN, y, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            tot = tl.zeros_like(y)
            for k in tl.static_range(SPLIT):
                tot += tl.load(ws + k * MN, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, tot.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock, 0)


@triton.jit(do_not_specialize=["M", "N"])
def hybrid_linear_kernel(
    x_ptr, out_ptr, bias_ptr, ws_ptr, lock_ptr,
    sp_vals_ptr, sp_meta_ptr, sp_meta16_ptr, dn_vals_ptr, sp_cols_ptr, sp_ptr_ptr, dn_cols_ptr, dn_ptr_ptr, row_info_ptr,
    M, N, stride_xm, stride_xk, stride_om,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr,
    MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, META16: tl.constexpr,
    LSTAGES: tl.constexpr = None, UNROLL: tl.constexpr = None,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    BPT: tl.constexpr = TILE_R // BN  # row blocks per tile-row
    r = pid_n // BPT
    offs_i = (pid_n % BPT) * BN + tl.arange(0, BN)  # rows inside the tile-row
    rows = r * TILE_R + offs_i
    row_ok = rows < N
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    ar_k = tl.arange(0, BK)
    ar_v = tl.arange(0, BK // 2)

    info = row_info_ptr + r * 8
    sp_len = tl.load(info + 0)
    sp_off = tl.multiple_of(tl.load(info + 1), 8)
    sp_stride = tl.multiple_of(tl.load(info + 2), 8)
    mt_off = tl.multiple_of(tl.load(info + 3), 16)
    mt_stride = tl.multiple_of(tl.load(info + 4), 16)
    dn_len = tl.load(info + 5)
    dn_off = tl.multiple_of(tl.load(info + 6), 8)
    dn_stride = tl.multiple_of(tl.load(info + 7), 8)
    sp_first = tl.load(sp_ptr_ptr + r)
    dn_first = tl.load(dn_ptr_ptr + r)

    if MODE == 0:
        acc = tl.zeros((BM, BN, BK), dtype=tl.float32)
    elif MODE == 3:
        acc = tl.zeros((BM, BN, BK), dtype=tl.float32)  # dense tiles
        acc_s = tl.zeros((BM, BN, BK // 4), dtype=tl.float32)  # 2:4 tiles
    elif MODE == 1:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)

    # ---- 2:4 tiles of this tile-row
    v_rows = sp_vals_ptr + sp_off + offs_i[:, None].to(tl.int64) * sp_stride
    t_rows = sp_meta_ptr + mt_off + offs_i[:, None].to(tl.int64) * mt_stride
    t16_rows = sp_meta16_ptr + mt_off // 2 + offs_i[:, None].to(tl.int64) * (mt_stride // 2)
    n_chunks = tl.cdiv(sp_len, BK)
    c_lo = pid_s * n_chunks // SPLIT
    c_hi = (pid_s + 1) * n_chunks // SPLIT
    for c in tl.range(c_lo, c_hi, num_stages=LSTAGES, loop_unroll_factor=UNROLL):
        kk = c * BK
        slot = kk // TILE_C
        col0 = tl.load(sp_cols_ptr + sp_first + slot).to(tl.int64) * TILE_C + (kk - slot * TILE_C)
        col0 = tl.multiple_of(col0, BK)
        kv = kk // 2 + ar_v
        v = tl.load(v_rows + kv[None, :], mask=row_ok[:, None] & (kv[None, :] < sp_stride), other=0.0)
        nib = _load_nibbles(t_rows, t16_rows, kk, row_ok, mt_stride, BN, BK, META16)
        if MODE == 3:
            acc_s = _gather_fma(acc_s, v, nib, x_ptr, offs_m, m_ok, col0 + ar_k, (kk + ar_k) < sp_len,
                                stride_xm, stride_xk, BM, BN, BK)
        else:
            w = _expand24(v, nib, BN, BK)
            acc = _accumulate(acc, w, x_ptr, offs_m, m_ok, col0 + ar_k, (kk + ar_k) < sp_len,
                              stride_xm, stride_xk, MODE, DOT_F32)

    # ---- dense tiles of this tile-row
    d_rows = dn_vals_ptr + dn_off + offs_i[:, None].to(tl.int64) * dn_stride
    n_chunks = tl.cdiv(dn_len, BK)
    c_lo = pid_s * n_chunks // SPLIT
    c_hi = (pid_s + 1) * n_chunks // SPLIT
    for c in tl.range(c_lo, c_hi, num_stages=LSTAGES, loop_unroll_factor=UNROLL):
        kk = c * BK
        slot = kk // TILE_C
        col0 = tl.load(dn_cols_ptr + dn_first + slot).to(tl.int64) * TILE_C + (kk - slot * TILE_C)
        col0 = tl.multiple_of(col0, BK)
        kd = kk + ar_k
        w = tl.load(d_rows + kd[None, :], mask=row_ok[:, None] & (kd[None, :] < dn_stride), other=0.0)
        acc = _accumulate(acc, w, x_ptr, offs_m, m_ok, col0 + ar_k, kd < dn_len,
                          stride_xm, stride_xk, MODE, DOT_F32)

    if MODE == 0:
        y = tl.sum(acc, axis=2)
    elif MODE == 3:
        y = tl.sum(acc, axis=2) + tl.sum(acc_s, axis=2)
    elif MODE == 1:
        y = tl.trans(acc)
    else:
        y = acc
    _write_output(y, out_ptr, bias_ptr, ws_ptr, lock_ptr + pid_m * tl.num_programs(0) + pid_n, offs_m, m_ok,
                  rows, row_ok, pid_s, M, N, stride_om, SPLIT, HAS_BIAS)


@triton.jit
def unpack_kernel(
    out_ptr, sp_vals_ptr, sp_meta_ptr, dn_vals_ptr, kinds_ptr, slot_ptr, row_info_ptr,
    N, K, n_tile_cols,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Write the dense masked weight ``[N, K]`` (row-major) of a packed layer; one program per
    ``BN`` rows x one tile."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    BPT: tl.constexpr = TILE_R // BN
    r = pid_n // BPT
    offs_i = (pid_n % BPT) * BN + tl.arange(0, BN)
    rows = r * TILE_R + offs_i
    row_ok = rows < N
    kind = tl.load(kinds_ptr + r * n_tile_cols + c).to(tl.int32)
    slot = tl.load(slot_ptr + r * n_tile_cols + c)
    info = row_info_ptr + r * 8
    ar_k = tl.arange(0, BK)
    for kc in range(0, TILE_C, BK):
        cols = c * TILE_C + kc + ar_k
        ok = row_ok[:, None] & (cols[None, :] < K)
        if kind == 0:
            kk = slot * TILE_C + kc
            sp_stride = tl.multiple_of(tl.load(info + 2), 8)
            mt_stride = tl.multiple_of(tl.load(info + 4), 16)
            kv = kk // 2 + tl.arange(0, BK // 2)
            v = tl.load(sp_vals_ptr + tl.load(info + 1) + offs_i[:, None].to(tl.int64) * sp_stride + kv[None, :],
                        mask=row_ok[:, None] & (kv[None, :] < sp_stride), other=0.0)
            kt = kk // 8 + tl.arange(0, BK // 8)
            mt = tl.load(sp_meta_ptr + tl.load(info + 3) + offs_i[:, None].to(tl.int64) * mt_stride + kt[None, :],
                         mask=row_ok[:, None] & (kt[None, :] < mt_stride), other=0)
            w = _expand24(v, _nibbles(mt, BN, BK // 4), BN, BK)
        elif kind == 1:
            kd = slot * TILE_C + kc + ar_k
            dn_stride = tl.multiple_of(tl.load(info + 7), 8)
            w = tl.load(dn_vals_ptr + tl.load(info + 6) + offs_i[:, None].to(tl.int64) * dn_stride + kd[None, :],
                        mask=row_ok[:, None] & (kd[None, :] < dn_stride), other=0.0)
        else:
            w = tl.zeros((BN, BK), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


# ====================================================================== flat decode kernel
# One program = BN output rows x one *item*: a run of up to NIT*TS consecutive 2:4 tiles (or NIT*TD dense
# tiles) of one tile-row. Everything a program needs is in a precomputed per-program descriptor (built
# once per layer and configuration by ``ops.flat_plan``), so its first loads (values, metadata, x) issue
# right after one descriptor read, with no chain row_info -> sp_ptr -> sp_cols -> x. With NIT == 1 a
# program loads its whole item at once and the hardware overlaps many short programs per SM; with
# NIT > 1 the loads of chunk i+1 are issued before chunk i is used (register double buffering).
# Partial sums of the items of one row block are added with fp32 atomics into a zeroed workspace; the
# last program of the block (an arrival counter) writes the output and re-zeroes workspace and counter.
# Descriptor columns (int32):
FD_KIND, FD_VOFF, FD_VSTRIDE, FD_MOFF, FD_MSTRIDE, FD_NPOS, FD_ROW0, FD_RIB, FD_NPARTS, FD_CB, FD_BLK = range(11)
FLAT_DESC_W = 12


@triton.jit
def _flat_x(x_ptr, xcb_ptr, cb, c0, npos, offs_m, m_ok, K, stride_xm, stride_xk,
            KX: tl.constexpr, TILE_C: tl.constexpr, TRANS: tl.constexpr):
    """x at the input columns of item positions ``c0 .. c0+KX``: ``[BM, KX]`` (``[KX, BM]`` if TRANS);
    zero beyond the item (``npos``) and beyond ``K``."""
    p = c0 + tl.arange(0, KX)
    col = tl.load(xcb_ptr + cb + p // TILE_C) + p % TILE_C  # xcb: one entry per tile slot, never short
    # contiguous in runs of TILE_C, each starting at a multiple of TILE_C (tile column bases)
    col = tl.max_contiguous(tl.multiple_of(col, TILE_C), TILE_C)
    npt = (npos + TILE_C - 1) // TILE_C * TILE_C  # items end at tile boundaries or at K (edge tile)
    ok = (p < npt) & (col < K)
    if TRANS:
        x = tl.load(x_ptr + offs_m[None, :] * stride_xm + col[:, None] * stride_xk,
                    mask=m_ok[None, :] & ok[:, None], other=0.0)
    else:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk,
                    mask=m_ok[:, None] & ok[None, :], other=0.0)
    return x


@triton.jit
def _gather_acc(acc, v, nib, x, BM: tl.constexpr, BN: tl.constexpr, KX: tl.constexpr):
    """acc[BM, BN, KX/4] += v0 * x[4g + p0] + v1 * x[4g + p1] with x already in registers (fp32)."""
    x0, x1, x2, x3 = _x_planes(x, BM, KX // 4)
    v0, v1 = tl.split(tl.reshape(v, (BN, KX // 4, 2)))
    xs0, xs1 = _pick_x((nib & 3)[None, :, :], (nib >> 2)[None, :, :],
                       x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :])
    acc += v0.to(tl.float32)[None, :, :] * xs0 + v1.to(tl.float32)[None, :, :] * xs1
    return acc


@triton.jit
def _lo_f32(a, BF16: tl.constexpr):
    """fp32 value of the low 16-bit float of each int32 pair."""
    if BF16:
        return (a << 16).to(tl.float32, bitcast=True)
    else:
        return (a & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _hi_f32(a, BF16: tl.constexpr):
    """fp32 value of the high 16-bit float of each int32 pair."""
    if BF16:
        return (a & -65536).to(tl.float32, bitcast=True)
    else:
        return (a >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pair_fma(acc, v, nib, xa, xb, BF16: tl.constexpr, ASM: tl.constexpr):
    """acc + v.lo * x[p0] + v.hi * x[p1] elementwise: ``v`` = the two kept values of a group (int32 pair),
    ``nib`` = its code ``p0 | p1 << 2``, ``xa``/``xb`` = x of its 4 positions as two int32 pairs.
    ASM (bf16 only): one ``prmt`` picks (x[p0], x[p1]) with a selector computed by 3 integer ops."""
    if ASM:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 s, t, q, x0, x1, v0, v1;
            and.b32 s, $2, 3;
            shl.b32 t, $2, 6;
            and.b32 t, t, 768;
            or.b32 s, s, t;
            mad.lo.u32 s, s, 34, 4112;
            prmt.b32 q, $3, $4, s;
            shl.b32 x0, q, 16;
            and.b32 x1, q, -65536;
            shl.b32 v0, $1, 16;
            and.b32 v1, $1, -65536;
            fma.rn.f32 $0, v0, x0, $5;
            fma.rn.f32 $0, v1, x1, $0;
            }""",
            "=r,r,r,r,r,r",
            [v, nib, xa, xb, acc],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        xs0, xs1 = _pick_x(nib & 3, nib >> 2, _lo_f32(xa, BF16), _hi_f32(xa, BF16), _lo_f32(xb, BF16),
                           _hi_f32(xb, BF16))
        return acc + _lo_f32(v, BF16) * xs0 + _hi_f32(v, BF16) * xs1


@triton.jit
def _flat_sparse_g(x32_ptr, xcb_ptr, sp_vals32_ptr, sp_meta16_ptr, voff, vstride, moff, mstride, npos, cb,
                   rr, row_ok, offs_m, M, K, stride_xm,
                   TILE_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
                   NIT: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """y ``[BM, BN]`` of one 2:4 item, gather/FMA (no expansion): data as ``[BN, U, 4]`` int32, U = units of
    4 groups = one 16-byte vector of kept values + one 16-bit metadata word per unit and row."""
    KX: tl.constexpr = T * TILE_C
    U: tl.constexpr = KX // 16
    ar_u = tl.arange(0, U)
    ar_j = tl.arange(0, 4)
    v_rows = sp_vals32_ptr + voff // 2 + rr[:, None, None] * (vstride // 2)
    m_rows = sp_meta16_ptr + moff + rr[:, None] * mstride
    nu = (npos + 15) // 16  # units of the item (rows padded to 16 B: a partial last unit reads padding)
    npt = (npos + TILE_C - 1) // TILE_C * TILE_C
    sh = (ar_j * 4)[None, None, :]
    y = tl.zeros((BM, BN), dtype=tl.float32)
    # chunk 0
    u = ar_u
    v = tl.load(v_rows + (u * 4)[None, :, None] + ar_j[None, None, :],
                mask=row_ok[:, None, None] & (u < nu)[None, :, None], other=0)
    mw = tl.load(m_rows + u[None, :], mask=row_ok[:, None] & (u < nu)[None, :], other=0)
    for i in tl.static_range(NIT):
        if i + 1 < NIT:
            un = (i + 1) * U + ar_u
            vn = tl.load(v_rows + (un * 4)[None, :, None] + ar_j[None, None, :],
                         mask=row_ok[:, None, None] & (un < nu)[None, :, None], other=0)
            mn = tl.load(m_rows + un[None, :], mask=row_ok[:, None] & (un < nu)[None, :], other=0)
        # input columns of the groups' first positions
        p = (i * U + ar_u)[:, None] * 16 + ar_j[None, :] * 4  # [U, 4]
        col = tl.load(xcb_ptr + cb + p // TILE_C) + p % TILE_C
        xok = (p < npt) & (col < K)
        nib = (mw.to(tl.int32)[:, :, None] >> sh) & 15
        for m in tl.static_range(BM):
            xmk = xok & ((p * 0 + m) < M)
            xr = x32_ptr + m * (stride_xm // 2) + col // 2
            xa = tl.load(xr, mask=xmk, other=0)
            xb = tl.load(xr + 1, mask=xmk, other=0)
            acc = tl.zeros((BN, U, 4), dtype=tl.float32)
            acc = _pair_fma(acc, v, nib, xa[None, :, :], xb[None, :, :], BF16, ASM)
            ym = tl.sum(tl.sum(acc, axis=2), axis=1)
            y += tl.where(offs_m[:, None] == m, ym[None, :], 0.0)
        if i + 1 < NIT:
            v = vn
            mw = mn
    return y


@triton.jit
def _flat_dense_g(x_ptr, xcb_ptr, dn_vals_ptr, voff, vstride, npos, cb,
                  rr, row_ok, offs_m, M, K, stride_xm, stride_xk,
                  TILE_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, NIT: tl.constexpr):
    """y ``[BM, BN]`` of one dense item, FMA in fp32 (2-D, one token at a time)."""
    KX: tl.constexpr = T * TILE_C
    d_rows = dn_vals_ptr + voff + rr[:, None] * vstride
    ar = tl.arange(0, KX)
    nd = (npos + 7) // 8 * 8  # rows padded to 8 values
    npt = (npos + TILE_C - 1) // TILE_C * TILE_C
    y = tl.zeros((BM, BN), dtype=tl.float32)
    w = tl.load(d_rows + ar[None, :], mask=row_ok[:, None] & (ar[None, :] < nd), other=0.0)
    for i in tl.static_range(NIT):
        if i + 1 < NIT:
            kd = (i + 1) * KX + ar
            wn = tl.load(d_rows + kd[None, :], mask=row_ok[:, None] & (kd[None, :] < nd), other=0.0)
        p = i * KX + ar
        col = tl.load(xcb_ptr + cb + p // TILE_C) + p % TILE_C
        col = tl.max_contiguous(tl.multiple_of(col, TILE_C), TILE_C)
        xok = (p < npt) & (col < K)
        wf = w.to(tl.float32)
        for m in tl.static_range(BM):
            xm = tl.load(x_ptr + m * stride_xm + col * stride_xk, mask=xok & ((p * 0 + m) < M), other=0.0)
            ym = tl.sum(wf * xm.to(tl.float32)[None, :], axis=1)
            y += tl.where(offs_m[:, None] == m, ym[None, :], 0.0)
        if i + 1 < NIT:
            w = wn
    return y


@triton.jit
def _flat_sparse(x_ptr, xcb_ptr, sp_vals_ptr, sp_meta16_ptr, voff, vstride, moff, mstride, npos, cb,
                 rr, row_ok, offs_m, m_ok, K, stride_xm, stride_xk,
                 TILE_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
                 NIT: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """y of one 2:4 item: ``[BN, BM]`` (DOT) or ``[BM, BN]``."""
    KX: tl.constexpr = T * TILE_C
    KV: tl.constexpr = KX // 2
    KW: tl.constexpr = KX // 16
    v_rows = sp_vals_ptr + voff + rr[:, None] * vstride
    m_rows = sp_meta16_ptr + moff + rr[:, None] * mstride
    ar_v = tl.arange(0, KV)
    ar_w = tl.arange(0, KW)
    # bounds rounded up to 16 B: the rows are padded to 16 B (values and metadata), anything read past
    # the item meets x == 0 (masked exactly in _flat_x)
    nv = (npos + 15) // 16 * 8
    nw = (npos + 127) // 128 * 8
    if DOT:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN, KX // 4), dtype=tl.float32)
    v = tl.load(v_rows + ar_v[None, :], mask=row_ok[:, None] & (ar_v[None, :] < nv), other=0.0)
    mw = tl.load(m_rows + ar_w[None, :], mask=row_ok[:, None] & (ar_w[None, :] < nw), other=0)
    xx = _flat_x(x_ptr, xcb_ptr, cb, 0, npos, offs_m, m_ok, K, stride_xm, stride_xk, KX, TILE_C, DOT)
    for i in tl.static_range(NIT):
        if i + 1 < NIT:  # prefetch chunk i+1 before using chunk i
            kv = (i + 1) * KV + ar_v
            kw = (i + 1) * KW + ar_w
            vn = tl.load(v_rows + kv[None, :], mask=row_ok[:, None] & (kv[None, :] < nv), other=0.0)
            mn = tl.load(m_rows + kw[None, :], mask=row_ok[:, None] & (kw[None, :] < nw), other=0)
            xn = _flat_x(x_ptr, xcb_ptr, cb, (i + 1) * KX, npos, offs_m, m_ok, K, stride_xm, stride_xk,
                         KX, TILE_C, DOT)
        wd = mw.to(tl.int32) & 0xFFFF
        nib = tl.reshape((wd[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]) & 15, (BN, KX // 4))
        if DOT:
            w = _expand24(v, nib, BN, KX)
            if DOT_F32:
                acc = tl.dot(w.to(tl.float32), xx.to(tl.float32), acc)
            else:
                acc = tl.dot(w, xx, acc)
        else:
            acc = _gather_acc(acc, v, nib, xx.to(tl.float32), BM, BN, KX)
        if i + 1 < NIT:
            v = vn
            mw = mn
            xx = xn
    if DOT:
        return tl.trans(acc)
    else:
        return tl.sum(acc, axis=2)


@triton.jit
def _flat_dense(x_ptr, xcb_ptr, dn_vals_ptr, voff, vstride, npos, cb,
                rr, row_ok, offs_m, m_ok, K, stride_xm, stride_xk,
                TILE_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
                NIT: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """y of one dense item: ``[BM, BN]``."""
    KX: tl.constexpr = T * TILE_C
    d_rows = dn_vals_ptr + voff + rr[:, None] * vstride
    ar = tl.arange(0, KX)
    nd = (npos + 7) // 8 * 8  # rows padded to 8 values
    if DOT:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN, KX), dtype=tl.float32)
    w = tl.load(d_rows + ar[None, :], mask=row_ok[:, None] & (ar[None, :] < nd), other=0.0)
    xx = _flat_x(x_ptr, xcb_ptr, cb, 0, npos, offs_m, m_ok, K, stride_xm, stride_xk, KX, TILE_C, DOT)
    for i in tl.static_range(NIT):
        if i + 1 < NIT:
            kd = (i + 1) * KX + ar
            wn = tl.load(d_rows + kd[None, :], mask=row_ok[:, None] & (kd[None, :] < nd), other=0.0)
            xn = _flat_x(x_ptr, xcb_ptr, cb, (i + 1) * KX, npos, offs_m, m_ok, K, stride_xm, stride_xk,
                         KX, TILE_C, DOT)
        if DOT:
            if DOT_F32:
                acc = tl.dot(w.to(tl.float32), xx.to(tl.float32), acc)
            else:
                acc = tl.dot(w, xx, acc)
        else:
            acc += xx.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if i + 1 < NIT:
            w = wn
            xx = xn
    if DOT:
        return tl.trans(acc)
    else:
        return tl.sum(acc, axis=2)


@triton.jit(do_not_specialize=["M", "N"])
def hybrid_flat_kernel(
    x_ptr, x32_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, desc_ptr, xcb_ptr,
    sp_vals_ptr, sp_vals32_ptr, sp_meta16_ptr, dn_vals_ptr,
    M, N, K, stride_xm, stride_xk, stride_om,
    TILE_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TS: tl.constexpr, TD: tl.constexpr,
    NIT: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, MA: tl.constexpr,
    PAIRS: tl.constexpr = False, BF16: tl.constexpr = True, ASM: tl.constexpr = False,
):
    """``Y = X @ W^T (+ bias)`` for ``M <= BM`` tokens over a flat grid of precomputed work items
    (see the comment above; ``ops.flat_plan`` builds the descriptors)."""
    d = desc_ptr + tl.program_id(0) * 12
    kind = tl.load(d + 0)
    voff = tl.multiple_of(tl.load(d + 1), 8)
    vstride = tl.multiple_of(tl.load(d + 2), 8)
    moff = tl.multiple_of(tl.load(d + 3), MA)  # int16 words
    mstride = tl.multiple_of(tl.load(d + 4), 8)  # int16 words (16 B)
    npos = tl.load(d + 5)
    row0 = tl.load(d + 6)
    rib = tl.load(d + 7)
    nparts = tl.load(d + 8)
    cb = tl.load(d + 9)
    blk = tl.load(d + 10)

    offs_n = tl.arange(0, BN)
    rows = row0 + offs_n
    row_ok = rows < N
    rr = (rib + offs_n).to(tl.int64)
    offs_m = tl.arange(0, BM)
    m_ok = offs_m < M

    y = tl.zeros((BM, BN), dtype=tl.float32)
    if PAIRS:  # gather/FMA on int32 value pairs ([BN, U, 4] layout, x contiguous)
        if kind == 0:
            y = _flat_sparse_g(x32_ptr, xcb_ptr, sp_vals32_ptr, sp_meta16_ptr, voff, vstride, moff, mstride, npos,
                               cb, rr, row_ok, offs_m, M, K, stride_xm, TILE_C, BM, BN, TS, NIT, BF16, ASM)
        elif kind == 1:
            y = _flat_dense_g(x_ptr, xcb_ptr, dn_vals_ptr, voff, vstride, npos, cb, rr, row_ok, offs_m, M, K,
                              stride_xm, stride_xk, TILE_C, BM, BN, TD, NIT)
    elif kind == 0:
        y = _flat_sparse(x_ptr, xcb_ptr, sp_vals_ptr, sp_meta16_ptr, voff, vstride, moff, mstride, npos, cb,
                         rr, row_ok, offs_m, m_ok, K, stride_xm, stride_xk,
                         TILE_C, BM, BN, TS, NIT, DOT, DOT_F32)
    elif kind == 1:
        y = _flat_dense(x_ptr, xcb_ptr, dn_vals_ptr, voff, vstride, npos, cb,
                        rr, row_ok, offs_m, m_ok, K, stride_xm, stride_xk,
                        TILE_C, BM, BN, TD, NIT, DOT, DOT_F32)

    out_mask = m_ok[:, None] & row_ok[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + rows[None, :]
    if nparts == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws = ws_ptr + offs_m[:, None].to(tl.int64) * N + rows[None, :]
        tl.atomic_add(ws, y, mask=out_mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel")
        if arrived == nparts - 1:
            tot = tl.load(ws, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, tot.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(ws, tl.zeros_like(tot), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + blk, 0)


# ---------------------------------------------------------------------- persistent variant (1 token)
# The same work items, walked by a fixed grid of programs (a few per SM): while item t is reduced and its
# partial sums are published (atomics, fence, arrival counter), the loads of item t+1 are already in flight
# and the descriptor of item t+2 is being read. Both kinds use one data shape: ``[BN, U, 4]`` int32 = the
# kept value pairs of 16*U positions of 2:4 tiles, or the weight pairs of 8*U positions of dense tiles.
@triton.jit
def _p_desc(desc_ptr, q, P):
    ok = q < P
    d = desc_ptr + q * 12
    kind = tl.load(d + 0, mask=ok, other=3)
    voff = tl.load(d + 1, mask=ok, other=0)
    vstride = tl.load(d + 2, mask=ok, other=0)
    moff = tl.load(d + 3, mask=ok, other=0)
    mstride = tl.load(d + 4, mask=ok, other=0)
    npos = tl.load(d + 5, mask=ok, other=0)
    row0 = tl.load(d + 6, mask=ok, other=0)
    rib = tl.load(d + 7, mask=ok, other=0)
    nparts = tl.load(d + 8, mask=ok, other=1)
    cb = tl.load(d + 9, mask=ok, other=0)
    blk = tl.load(d + 10, mask=ok, other=0)
    return kind, voff, vstride, moff, mstride, npos, row0, rib, nparts, cb, blk


@triton.jit
def _p_load_vm(sp_vals32_ptr, dn_vals32_ptr, sp_meta16_ptr, kind, voff, vstride, moff, mstride, npos, row0, rib, N,
               BN: tl.constexpr, U: tl.constexpr):
    offs_n = tl.arange(0, BN)
    ar_u = tl.arange(0, U)
    ar_j = tl.arange(0, 4)
    row_ok = ((row0 + offs_n) < N) & ((offs_n * 0 + kind) < 2)  # (tensor-valued kind tests: interpreter)
    rr = (rib + offs_n).to(tl.int64)
    is_sp = kind == 0
    nu = tl.where(is_sp, (npos + 15) // 16, (npos + 7) // 8)
    voff2 = tl.multiple_of(voff // 2, 4)  # row strides / offsets: multiples of 8 values = 4 pairs (16 B)
    vstride2 = tl.multiple_of(vstride // 2, 4)
    off = voff2 + rr[:, None, None] * vstride2 + (ar_u * 4)[None, :, None] + ar_j[None, None, :]
    vmask = row_ok[:, None, None] & (ar_u < nu)[None, :, None]
    if is_sp:
        v = tl.load(sp_vals32_ptr + off, mask=vmask, other=0)
    else:
        v = tl.load(dn_vals32_ptr + off, mask=vmask, other=0)
    mw = tl.load(sp_meta16_ptr + moff + rr[:, None] * tl.multiple_of(mstride, 8) + ar_u[None, :],
                 mask=row_ok[:, None] & ((ar_u < nu) & ((ar_u * 0 + kind) == 0))[None, :], other=0)
    return v, mw


@triton.jit
def _p_cols(xcb_ptr, kind, npos, cb, K, TILE_C: tl.constexpr, U: tl.constexpr):
    """Input column of each pair start ([U, 4]) and its mask."""
    step = tl.where(kind == 0, 4, 2)  # positions per (u, j): a group of 4 (2:4) or a pair (dense)
    p = ((tl.arange(0, U) * 4)[:, None] + tl.arange(0, 4)[None, :]) * step
    npt = (npos + TILE_C - 1) // TILE_C * TILE_C
    ok = (p < npt) & ((p * 0 + kind) < 2)
    col = tl.load(xcb_ptr + cb + p // TILE_C, mask=ok, other=0) + p % TILE_C
    return col, ok & (col < K)


@triton.jit
def _p_tail(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr, row0, nparts, blk, kind, N,
            BN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Publish the partial sums ``y [BN]`` (fp32) of one item of row block ``blk`` (see hybrid_flat_kernel)."""
    rows = row0 + tl.arange(0, BN)
    ok = (rows < N) & ((rows * 0 + kind) < 3)
    if nparts == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(ws_ptr + rows, y, mask=ok, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel")
        if arrived == nparts - 1:
            tot = tl.load(ws_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, tot.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(ws_ptr + rows, tl.zeros_like(tot), mask=ok)
            tl.atomic_xchg(cnt_ptr + blk, 0)


@triton.jit(do_not_specialize=["N", "P"])
def hybrid_flat_persist_kernel(
    x32_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, desc_ptr, xcb_ptr,
    sp_vals32_ptr, sp_meta16_ptr, dn_vals32_ptr,
    N, K, P,
    TILE_C: tl.constexpr, BN: tl.constexpr, TS: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr,
    ASM: tl.constexpr,
):
    """``y = W x (+ bias)`` for one token; programs walk the work items ``pid, pid + G, ...`` with the loads
    of the next item in flight (the descriptors of ``ops.flat_plan`` with ``td = ts / 2``)."""
    U: tl.constexpr = TS * TILE_C // 16
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    sh = (tl.arange(0, 4) * 4)[None, None, :]
    # item 0 of this program: descriptor, data, x
    kind, voff, vstride, moff, mstride, npos, row0, rib, nparts, cb, blk = _p_desc(desc_ptr, pid, P)
    v, mw = _p_load_vm(sp_vals32_ptr, dn_vals32_ptr, sp_meta16_ptr, kind, voff, vstride, moff, mstride, npos,
                       row0, rib, N, BN, U)
    col, xok = _p_cols(xcb_ptr, kind, npos, cb, K, TILE_C, U)
    xa = tl.load(x32_ptr + col // 2, mask=xok, other=0)
    xb = tl.load(x32_ptr + col // 2 + 1, mask=xok & ((col * 0 + kind) == 0), other=0)
    kind1, voff1, vstride1, moff1, mstride1, npos1, row01, rib1, nparts1, cb1, blk1 = _p_desc(desc_ptr, pid + G, P)
    for t in range(0, tl.cdiv(P - pid, G)):
        # loads of item t+1, descriptor of item t+2
        v1, mw1 = _p_load_vm(sp_vals32_ptr, dn_vals32_ptr, sp_meta16_ptr, kind1, voff1, vstride1, moff1, mstride1,
                             npos1, row01, rib1, N, BN, U)
        col1, xok1 = _p_cols(xcb_ptr, kind1, npos1, cb1, K, TILE_C, U)
        kind2, voff2, vstride2, moff2, mstride2, npos2, row02, rib2, nparts2, cb2, blk2 = _p_desc(
            desc_ptr, pid + (t + 2) * G, P)
        # item t
        acc = tl.zeros((BN, U, 4), dtype=tl.float32)
        if kind == 0:
            nib = (mw.to(tl.int32)[:, :, None] >> sh) & 15
            acc = _pair_fma(acc, v, nib, xa[None, :, :], xb[None, :, :], BF16, ASM)
        else:
            acc += _lo_f32(v, BF16) * _lo_f32(xa, BF16)[None, :, :] + _hi_f32(v, BF16) * _hi_f32(xa, BF16)[None, :, :]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        # x of item t+1 (its column table has arrived by now)
        xa1 = tl.load(x32_ptr + col1 // 2, mask=xok1, other=0)
        xb1 = tl.load(x32_ptr + col1 // 2 + 1, mask=xok1 & ((col1 * 0 + kind1) == 0), other=0)
        _p_tail(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr, row0, nparts, blk, kind, N, BN, HAS_BIAS)
        # rotate
        kind, voff, vstride, moff, mstride, npos, row0, rib, nparts, cb, blk = \
            kind1, voff1, vstride1, moff1, mstride1, npos1, row01, rib1, nparts1, cb1, blk1
        kind1, voff1, vstride1, moff1, mstride1, npos1, row01, rib1, nparts1, cb1, blk1 = \
            kind2, voff2, vstride2, moff2, mstride2, npos2, row02, rib2, nparts2, cb2, blk2
        v = v1
        mw = mw1
        xa = xa1
        xb = xb1
