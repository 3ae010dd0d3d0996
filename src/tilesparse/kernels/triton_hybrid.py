"""Triton code shared by the hybrid kernels, and ``unpack_kernel``.

* ``@triton.jit`` helpers on the packed 2:4 groups (two kept values and a 4-bit code ``p0 | p1 << 2`` per
  group of four columns, see :mod:`.format`): ``_nibbles`` (metadata bytes -> group codes), ``_pos_planes``
  (a group's kept values -> its weights at positions 0..3), ``_expand24`` (compressed values -> a dense
  block), ``_x_planes`` / ``_pick_x`` (x at a group's positions), and ``_write_output`` (a program's output
  block, split-K through per-split workspace slices that the last program to arrive adds up). Used by the
  stream kernel (:mod:`.triton_stream`) and ``benchmarks/decode_probe.py``.
* ``unpack_kernel``: writes a packed layer's dense masked weight, for the ``"unpack"`` path of :mod:`.ops`
  (unpack into a scratch buffer, then ``F.linear``).

Pointer-alignment facts the format guarantees (row strides multiples of 8 values / 16 metadata bytes) are
passed to the compiler with ``tl.multiple_of`` so loads are 16 bytes wide.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _row_block(ptr, off, rows_i, stride, start, row_ok, NK: tl.constexpr):
    """``NK`` consecutive elements from ``start`` of each row ``rows_i`` of a tile-row's stored block (the block
    at ``ptr + off``, rows ``stride`` elements apart): ``[len(rows_i), NK]``, 0 past a row's end and on rows
    outside the layer (``row_ok``)."""
    k = start + tl.arange(0, NK)
    return tl.load(ptr + off + rows_i[:, None].to(tl.int64) * stride + k[None, :],
                   mask=row_ok[:, None] & (k[None, :] < stride), other=0)


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
            v = _row_block(sp_vals_ptr, tl.load(info + 1), offs_i, sp_stride, kk // 2, row_ok, BK // 2)
            mt = _row_block(sp_meta_ptr, tl.load(info + 3), offs_i, mt_stride, kk // 8, row_ok, BK // 8)
            w = _expand24(v, _nibbles(mt, BN, BK // 4), BN, BK)
        elif kind == 1:
            dn_stride = tl.multiple_of(tl.load(info + 7), 8)
            w = _row_block(dn_vals_ptr, tl.load(info + 6), offs_i, dn_stride, slot * TILE_C + kc, row_ok, BK)
        else:
            w = tl.zeros((BN, BK), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)
