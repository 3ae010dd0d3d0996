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
def _gather_acc(acc, v, nib, x, BM: tl.constexpr, BN: tl.constexpr, KX: tl.constexpr):
    """acc[BM, BN, KX/4] += v0 * x[4g + p0] + v1 * x[4g + p1] with x already in registers (fp32)."""
    x0, x1, x2, x3 = _x_planes(x, BM, KX // 4)
    v0, v1 = tl.split(tl.reshape(v, (BN, KX // 4, 2)))
    xs0, xs1 = _pick_x((nib & 3)[None, :, :], (nib >> 2)[None, :, :],
                       x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :])
    acc += v0.to(tl.float32)[None, :, :] * xs0 + v1.to(tl.float32)[None, :, :] * xs1
    return acc


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
