"""Triton kernels for the 4-bit packed hybrid format (:mod:`.format_q4`): the decode kernel ``hybrid_q4_kernel``
and its launcher :func:`q4_linear_triton` (below), and ``unpack_q4_kernel`` / :func:`unpack_q4_triton`, which write
the dequantized weight for a prefill's ``F.linear`` (see its docstring).

``out[M, N] = x[M, K] @ W^T (+ bias)`` for a few tokens (``M <= BM <= 16``) read straight from the packed
bytes, the weights dequantized in registers (``scale * (code - zero)``, scale and zero point at ``[row, column
// group_size]``). The structure is the 16-bit stream kernel's (:mod:`.triton_stream`):

* grid ``(row blocks, SPLIT)``: a program owns ``BN`` rows of one tile-row and ``1/SPLIT`` of that tile-row's
  2:4 chunks and of its dense chunks (a chunk = ``TS`` 2:4 tiles or ``TD`` dense tiles, in the order the format
  stores them, so the codes are one contiguous run per row); with ``PREF`` the loads of the next chunk are in
  flight while the current one is used. ``SPLIT > 1`` adds the partial sums through per-split workspace slices
  (``_write_output``).
* 2:4 chunk: ``[BN, KS/4]`` code bytes (byte ``g`` holds group ``g``'s two kept codes, the one at position
  ``p0`` in the low nibble), the ``[BN, KS/8]`` metadata bytes (``p0 | p1 << 2`` per group) and x at the
  chunk's ``KS`` input columns. Dense chunk: ``[BN, KD/2]`` code bytes (even position in the low nibble) and x.
* Scales and zero points: ``GROUP_TILE`` (``group_size`` a multiple of the tile width, so a tile lies in one
  group): one scale and zero per row and tile, loaded with the chunk; otherwise gathered per weight from its
  input column (any group size: a partial last group, groups crossing tile edges).
* Products, accumulated in fp32: one token (``BM == 1``): by FMA into a ``[BN, lanes]`` accumulator, x picked
  per kept value with its 2-bit position (no expansion of the 2:4 groups); several tokens: the 2:4 weights
  expanded into four position planes, then either FMA broadcast over the tokens (summed per chunk) or,
  ``DOT``, ``tl.dot`` of the weights in x's dtype on tensor cores (``BM >= 16``, ``BN >= 32``).

All-zero tiles are stored nowhere and never visited; a tile-row without stored tiles writes the bias (or
zeros). Loads are masked per tile (``EVEN``: ``in_features`` a multiple of the tile width) or, with a partial
edge tile, per element against the tile-row's K-space lengths; rows past ``out_features`` are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .format import RI_DN_LEN, RI_MT_OFF, RI_MT_STRIDE, RI_SP_LEN, ROW_INFO_COLS
from .format_q4 import QI_DN_OFF, QI_DN_STRIDE, QI_SP_OFF, QI_SP_STRIDE, PackedHybridQ4, check_q4_operands
from .ops import _buffer, _is_pow2, _largest_pow2_divisor_le, _pow2_at_least, interpreting
from .triton_hybrid import _expand24, _nibbles, _pick_x, _pos_planes, _row_block, _write_output, _x_planes
from .triton_stream import _dot_acc, _load_x, _ok

MAX_TOKENS = 16
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_RI: tl.constexpr = tl.constexpr(ROW_INFO_COLS)
_RI_SP_LEN: tl.constexpr = tl.constexpr(RI_SP_LEN)
_RI_MT_OFF: tl.constexpr = tl.constexpr(RI_MT_OFF)
_RI_MT_STRIDE: tl.constexpr = tl.constexpr(RI_MT_STRIDE)
_RI_DN_LEN: tl.constexpr = tl.constexpr(RI_DN_LEN)
_QI_SP_OFF: tl.constexpr = tl.constexpr(QI_SP_OFF)
_QI_SP_STRIDE: tl.constexpr = tl.constexpr(QI_SP_STRIDE)
_QI_DN_OFF: tl.constexpr = tl.constexpr(QI_DN_OFF)
_QI_DN_STRIDE: tl.constexpr = tl.constexpr(QI_DN_STRIDE)


# ---------------------------------------------------------------------------------------- scales, zeros
@triton.jit
def _tile_params(scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, t0, srow, row_ok, GS, T: tl.constexpr,
                 TILE_C: tl.constexpr):
    """Scale and zero point (fp32 ``[BN, T]``) of every row and tile of a chunk starting at tile ``t0``, for
    group sizes that are multiples of the tile width (one group per tile); zero for tiles not stored."""
    t = t0 + tl.arange(0, T)
    tok = t < ntiles
    grp = tl.load(cols_ptr + cbase + t, mask=tok, other=0) * TILE_C // GS
    ok = row_ok[:, None] & tok[None, :]
    s = tl.load(scales_ptr + srow[:, None] + grp[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(zeros_ptr + srow[:, None] + grp[None, :], mask=ok, other=0).to(tl.float32)
    return s, z


@triton.jit
def _chunk_params(scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, t0, srow, row_ok, GS, BN: tl.constexpr,
                  T: tl.constexpr, TILE_C: tl.constexpr, GROUP_TILE: tl.constexpr):
    """A chunk's per-tile scales and zero points (:func:`_tile_params`) with ``GROUP_TILE``; zeros otherwise
    (the weights then gather their own)."""
    if GROUP_TILE:
        s, z = _tile_params(scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, t0, srow, row_ok, GS, T, TILE_C)
    else:
        s = tl.zeros((BN, T), dtype=tl.float32)
        z = s
    return s, z


@triton.jit
def _per_lane(v, BN: tl.constexpr, T: tl.constexpr, PER: tl.constexpr):
    """Per-tile values ``[BN, T]`` -> ``[BN, T * PER]``, each repeated over its tile's ``PER`` lanes."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BN, T, PER)), (BN, T * PER))


@triton.jit
def _col_params(scales_ptr, zeros_ptr, srow, col, ok, GS):
    """Scale and zero point (fp32) of the weights at input columns ``col`` (``[BN, L]`` or ``[1, L]``) of the
    rows whose scale rows start at ``srow [BN]``; zero where not ``ok``."""
    grp = col // GS
    s = tl.load(scales_ptr + srow[:, None] + grp, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(zeros_ptr + srow[:, None] + grp, mask=ok, other=0).to(tl.float32)
    return s, z


@triton.jit
def _lane_cols(cols_ptr, cbase, ntiles, t0, L: tl.constexpr, STEP: tl.constexpr, TILE_C: tl.constexpr):
    """Input column of the first position of each of a chunk's ``L`` lanes of ``STEP`` positions (``[L]``)."""
    PER: tl.constexpr = TILE_C // STEP
    lane = tl.arange(0, L)
    t = t0 + lane // PER
    return tl.load(cols_ptr + cbase + t, mask=t < ntiles, other=0) * TILE_C + (lane % PER) * STEP


# ---------------------------------------------------------------------------------------- chunk loads
@triton.jit
def _load_sp(codes_ptr, meta_ptr, x_ptr, cols_ptr, scales_ptr, zeros_ptr, cbase, ntiles, c, crow, mrow, srow,
             sp_len, GS, offs_m, m_ok, row_ok, stride_xm, stride_xk, BM: tl.constexpr, BN: tl.constexpr,
             TS: tl.constexpr, TILE_C: tl.constexpr, EVEN: tl.constexpr, GROUP_TILE: tl.constexpr):
    """Loads of 2:4 chunk ``c``: code bytes ``[BN, KS/4]``, metadata bytes ``[BN, KS/8]``, x ``[BM, KS]`` and,
    with ``GROUP_TILE``, the tiles' scales and zero points ``[BN, TS]`` (zeros otherwise)."""
    KS: tl.constexpr = TS * TILE_C
    t0 = c * TS
    j = tl.arange(0, KS // 4)
    ok = _ok(j, TILE_C // 4, t0, ntiles, sp_len // 4, EVEN)
    cb = tl.load(codes_ptr + crow[:, None] + (c * (KS // 4) + j)[None, :], mask=row_ok[:, None] & ok[None, :],
                 other=0)
    jm = tl.arange(0, KS // 8)
    ok = _ok(jm, TILE_C // 8, t0, ntiles, (sp_len + 7) // 8, EVEN)
    mb = tl.load(meta_ptr + mrow[:, None] + (c * (KS // 8) + jm)[None, :], mask=row_ok[:, None] & ok[None, :],
                 other=0)
    x = _load_x(x_ptr, cols_ptr, cbase, ntiles, t0, sp_len, offs_m, m_ok, stride_xm, stride_xk, BM, TS, TILE_C,
                EVEN, False)
    s, z = _chunk_params(scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, t0, srow, row_ok, GS, BN, TS, TILE_C,
                         GROUP_TILE)
    return cb, mb, x, s, z


@triton.jit
def _load_dn(codes_ptr, x_ptr, cols_ptr, scales_ptr, zeros_ptr, cbase, ntiles, c, crow, srow, dn_len, GS, offs_m,
             m_ok, row_ok, stride_xm, stride_xk, BM: tl.constexpr, BN: tl.constexpr, TD: tl.constexpr,
             TILE_C: tl.constexpr, EVEN: tl.constexpr, GROUP_TILE: tl.constexpr):
    """Loads of dense chunk ``c``: code bytes ``[BN, KD/2]``, x ``[BM, KD]`` and, with ``GROUP_TILE``, the
    tiles' scales and zero points ``[BN, TD]`` (zeros otherwise)."""
    KD: tl.constexpr = TD * TILE_C
    t0 = c * TD
    j = tl.arange(0, KD // 2)
    ok = _ok(j, TILE_C // 2, t0, ntiles, (dn_len + 1) // 2, EVEN)
    cb = tl.load(codes_ptr + crow[:, None] + (c * (KD // 2) + j)[None, :], mask=row_ok[:, None] & ok[None, :],
                 other=0)
    x = _load_x(x_ptr, cols_ptr, cbase, ntiles, t0, dn_len, offs_m, m_ok, stride_xm, stride_xk, BM, TD, TILE_C,
                EVEN, False)
    s, z = _chunk_params(scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, t0, srow, row_ok, GS, BN, TD, TILE_C,
                         GROUP_TILE)
    return cb, x, s, z


# ---------------------------------------------------------------------------------------- dequantization
@triton.jit
def _sp_weights(cb, mb, st, zt, scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, t0, srow, row_ok, sp_len, GS,
                BN: tl.constexpr, TS: tl.constexpr, TILE_C: tl.constexpr, GROUP_TILE: tl.constexpr):
    """A 2:4 chunk's kept weights, dequantized: ``w0`` (at position ``p0`` of its group) and ``w1`` (at ``p1``),
    fp32 ``[BN, G]`` each, and the positions."""
    G: tl.constexpr = TS * TILE_C // 4
    code = _nibbles(mb, BN, G)
    p0 = code & 3
    p1 = code >> 2
    cb = cb.to(tl.int32)
    c0 = (cb & 15).to(tl.float32)
    c1 = (cb >> 4).to(tl.float32)
    if GROUP_TILE:
        s = _per_lane(st, BN, TS, TILE_C // 4)
        z = _per_lane(zt, BN, TS, TILE_C // 4)
        w0 = (c0 - z) * s
        w1 = (c1 - z) * s
    else:
        colg = _lane_cols(cols_ptr, cbase, ntiles, t0, G, 4, TILE_C)[None, :]
        ok = row_ok[:, None] & (t0 * TILE_C + 4 * tl.arange(0, G) < sp_len)[None, :]
        s0, z0 = _col_params(scales_ptr, zeros_ptr, srow, colg + p0, ok, GS)
        s1, z1 = _col_params(scales_ptr, zeros_ptr, srow, colg + p1, ok, GS)
        w0 = (c0 - z0) * s0
        w1 = (c1 - z1) * s1
    return w0, w1, p0, p1


@triton.jit
def _dn_weights(cb, st, zt, scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, t0, srow, row_ok, dn_len, GS,
                BN: tl.constexpr, TD: tl.constexpr, TILE_C: tl.constexpr, GROUP_TILE: tl.constexpr):
    """A dense chunk's weights, dequantized: even positions ``we`` and odd ones ``wo``, fp32 ``[BN, KD/2]``."""
    H: tl.constexpr = TD * TILE_C // 2
    cb = cb.to(tl.int32)
    ce = (cb & 15).to(tl.float32)
    co = (cb >> 4).to(tl.float32)
    if GROUP_TILE:
        s = _per_lane(st, BN, TD, TILE_C // 2)
        z = _per_lane(zt, BN, TD, TILE_C // 2)
        we = (ce - z) * s
        wo = (co - z) * s
    else:
        cole = _lane_cols(cols_ptr, cbase, ntiles, t0, H, 2, TILE_C)[None, :]
        pos = (t0 * TILE_C + 2 * tl.arange(0, H))[None, :]
        se, ze = _col_params(scales_ptr, zeros_ptr, srow, cole, row_ok[:, None] & (pos < dn_len), GS)
        so, zo = _col_params(scales_ptr, zeros_ptr, srow, cole + 1, row_ok[:, None] & (pos + 1 < dn_len), GS)
        we = (ce - ze) * se
        wo = (co - zo) * so
    return we, wo


# ---------------------------------------------------------------------------------------- products
@triton.jit
def _acc_tokens(acc, w, x, DOT: tl.constexpr, F32: tl.constexpr):
    """``acc[BN, BM] += w[BN, k] @ x[BM, k]^T``: ``tl.dot`` of ``w`` in x's dtype (``DOT``) or fp32 FMA
    broadcast over the tokens."""
    if DOT:
        acc = _dot_acc(acc, w.to(x.dtype), x, F32)
    else:
        acc += tl.sum(w[:, None, :] * x.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _sp_product(acc, w0, w1, p0, p1, x, BM: tl.constexpr, G: tl.constexpr, ONE: tl.constexpr, DOT: tl.constexpr,
                F32: tl.constexpr):
    """Add a 2:4 chunk's products: ``ONE`` (one token, ``acc [BN, G]``): ``w0 * x[4g + p0] + w1 * x[4g + p1]``;
    otherwise (``acc [BN, BM]``) the four position planes times x's."""
    if ONE:
        x0, x1, x2, x3 = _x_planes(x.to(tl.float32), 1, G)
        xs0, xs1 = _pick_x(p0, p1, x0, x1, x2, x3)
        acc += w0 * xs0 + w1 * xs1
    else:
        x0, x1, x2, x3 = _x_planes(x, BM, G)
        d0, d1, d2, d3 = _pos_planes(w0, w1, p0, p1)
        acc = _acc_tokens(acc, d0, x0, DOT, F32)
        acc = _acc_tokens(acc, d1, x1, DOT, F32)
        acc = _acc_tokens(acc, d2, x2, DOT, F32)
        acc = _acc_tokens(acc, d3, x3, DOT, F32)
    return acc


@triton.jit
def _dn_product(acc, we, wo, x, BM: tl.constexpr, H: tl.constexpr, ONE: tl.constexpr, DOT: tl.constexpr,
                F32: tl.constexpr):
    """Add a dense chunk's products (``acc [BN, H]`` for ``ONE`` token, ``[BN, BM]`` otherwise)."""
    xe, xo = tl.split(tl.reshape(x, (BM, H, 2)))
    if ONE:
        acc += we * xe.to(tl.float32) + wo * xo.to(tl.float32)
    else:
        acc = _acc_tokens(acc, we, xe, DOT, F32)
        acc = _acc_tokens(acc, wo, xo, DOT, F32)
    return acc


@triton.jit
def _sp_step(acc, cb, mb, x, st, zt, scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, c, srow, row_ok, sp_len, GS,
             BM: tl.constexpr, BN: tl.constexpr, TS: tl.constexpr, TILE_C: tl.constexpr, GROUP_TILE: tl.constexpr,
             ONE: tl.constexpr, DOT: tl.constexpr, F32: tl.constexpr):
    w0, w1, p0, p1 = _sp_weights(cb, mb, st, zt, scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, c * TS, srow,
                                 row_ok, sp_len, GS, BN, TS, TILE_C, GROUP_TILE)
    return _sp_product(acc, w0, w1, p0, p1, x, BM, TS * TILE_C // 4, ONE, DOT, F32)


@triton.jit
def _dn_step(acc, cb, x, st, zt, scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, c, srow, row_ok, dn_len, GS,
             BM: tl.constexpr, BN: tl.constexpr, TD: tl.constexpr, TILE_C: tl.constexpr, GROUP_TILE: tl.constexpr,
             ONE: tl.constexpr, DOT: tl.constexpr, F32: tl.constexpr):
    we, wo = _dn_weights(cb, st, zt, scales_ptr, zeros_ptr, cols_ptr, cbase, ntiles, c * TD, srow, row_ok, dn_len,
                         GS, BN, TD, TILE_C, GROUP_TILE)
    return _dn_product(acc, we, wo, x, BM, TD * TILE_C // 2, ONE, DOT, F32)


# ---------------------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["M", "N", "NG"])
def hybrid_q4_kernel(
    x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
    sp_codes_ptr, sp_meta_ptr, dn_codes_ptr, sp_cols_ptr, sp_ptr_ptr, dn_cols_ptr, dn_ptr_ptr,
    row_info_ptr, q4_info_ptr, scales_ptr, zeros_ptr,
    M, N, NG, GS, stride_xm, stride_xk, stride_om,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TS: tl.constexpr,
    TD: tl.constexpr, SPLIT: tl.constexpr, PREF: tl.constexpr, DOT: tl.constexpr, GROUP_TILE: tl.constexpr,
    HAS_BIAS: tl.constexpr, F32: tl.constexpr, EVEN: tl.constexpr,
):
    """``out = x @ W^T (+ bias)`` for ``M <= BM`` tokens from a 4-bit packed layer; see the module docstring."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    NB: tl.constexpr = TILE_R // BN
    r = pid // NB
    offs_n = tl.arange(0, BN)
    rows = r * TILE_R + (pid % NB) * BN + offs_n
    row_ok = rows < N
    rr = ((pid % NB) * BN + offs_n).to(tl.int64)  # row inside the tile-row
    srow = rows.to(tl.int64) * NG  # start of the rows' scales and zero points
    offs_m = tl.arange(0, BM)
    m_ok = offs_m < M
    ONE: tl.constexpr = BM == 1 and not DOT
    G: tl.constexpr = TS * TILE_C // 4  # 2:4 groups per chunk
    H: tl.constexpr = TD * TILE_C // 2  # dense code bytes per chunk

    ri = row_info_ptr + r * _RI
    sp_len = tl.load(ri + _RI_SP_LEN)
    mrow = tl.multiple_of(tl.load(ri + _RI_MT_OFF) + rr * tl.load(ri + _RI_MT_STRIDE), 16)
    dn_len = tl.load(ri + _RI_DN_LEN)
    qi = q4_info_ptr + r * 4
    sp_crow = tl.multiple_of(tl.load(qi + _QI_SP_OFF) + rr * tl.load(qi + _QI_SP_STRIDE), 16)
    dn_crow = tl.multiple_of(tl.load(qi + _QI_DN_OFF) + rr * tl.load(qi + _QI_DN_STRIDE), 16)
    sp_base = tl.load(sp_ptr_ptr + r)
    n_sp = tl.load(sp_ptr_ptr + r + 1) - sp_base
    dn_base = tl.load(dn_ptr_ptr + r)
    n_dn = tl.load(dn_ptr_ptr + r + 1) - dn_base

    if ONE:
        acc = tl.zeros((BN, G), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    SHARED: tl.constexpr = not ONE or H == G  # one accumulator for both kinds of chunks

    # ---- 2:4 chunks of this program
    nsc = tl.cdiv(n_sp, TS)
    per = tl.cdiv(nsc, SPLIT)
    c0 = s * per
    c1 = tl.minimum(c0 + per, nsc)
    if PREF:
        if c0 < c1:
            cb, mb, x, st, zt = _load_sp(sp_codes_ptr, sp_meta_ptr, x_ptr, sp_cols_ptr, scales_ptr, zeros_ptr, sp_base,
                                         n_sp, c0, sp_crow, mrow, srow, sp_len, GS, offs_m, m_ok, row_ok, stride_xm,
                                         stride_xk, BM, BN, TS, TILE_C, EVEN, GROUP_TILE)
            for c in range(c0 + 1, c1):
                cbn, mbn, xn, stn, ztn = _load_sp(sp_codes_ptr, sp_meta_ptr, x_ptr, sp_cols_ptr, scales_ptr,
                                                  zeros_ptr, sp_base, n_sp, c, sp_crow, mrow, srow, sp_len, GS,
                                                  offs_m, m_ok, row_ok, stride_xm, stride_xk, BM, BN, TS, TILE_C, EVEN,
                                                  GROUP_TILE)
                acc = _sp_step(acc, cb, mb, x, st, zt, scales_ptr, zeros_ptr, sp_cols_ptr, sp_base, n_sp, c - 1, srow,
                               row_ok, sp_len, GS, BM, BN, TS, TILE_C, GROUP_TILE, ONE, DOT, F32)
                cb, mb, x, st, zt = cbn, mbn, xn, stn, ztn
            acc = _sp_step(acc, cb, mb, x, st, zt, scales_ptr, zeros_ptr, sp_cols_ptr, sp_base, n_sp, c1 - 1, srow,
                           row_ok, sp_len, GS, BM, BN, TS, TILE_C, GROUP_TILE, ONE, DOT, F32)
    else:
        for c in range(c0, c1):
            cb, mb, x, st, zt = _load_sp(sp_codes_ptr, sp_meta_ptr, x_ptr, sp_cols_ptr, scales_ptr, zeros_ptr, sp_base,
                                         n_sp, c, sp_crow, mrow, srow, sp_len, GS, offs_m, m_ok, row_ok, stride_xm,
                                         stride_xk, BM, BN, TS, TILE_C, EVEN, GROUP_TILE)
            acc = _sp_step(acc, cb, mb, x, st, zt, scales_ptr, zeros_ptr, sp_cols_ptr, sp_base, n_sp, c, srow, row_ok,
                           sp_len, GS, BM, BN, TS, TILE_C, GROUP_TILE, ONE, DOT, F32)

    # ---- dense chunks of this program
    ndc = tl.cdiv(n_dn, TD)
    per = tl.cdiv(ndc, SPLIT)
    c0 = s * per
    c1 = tl.minimum(c0 + per, ndc)
    if SHARED:
        acc_d = acc
    else:
        acc_d = tl.zeros((BN, H), dtype=tl.float32)
    if PREF:
        if c0 < c1:
            cb, x, st, zt = _load_dn(dn_codes_ptr, x_ptr, dn_cols_ptr, scales_ptr, zeros_ptr, dn_base, n_dn, c0,
                                     dn_crow, srow, dn_len, GS, offs_m, m_ok, row_ok, stride_xm, stride_xk, BM, BN,
                                     TD, TILE_C, EVEN, GROUP_TILE)
            for c in range(c0 + 1, c1):
                cbn, xn, stn, ztn = _load_dn(dn_codes_ptr, x_ptr, dn_cols_ptr, scales_ptr, zeros_ptr, dn_base, n_dn,
                                             c, dn_crow, srow, dn_len, GS, offs_m, m_ok, row_ok, stride_xm, stride_xk,
                                             BM, BN, TD, TILE_C, EVEN, GROUP_TILE)
                acc_d = _dn_step(acc_d, cb, x, st, zt, scales_ptr, zeros_ptr, dn_cols_ptr, dn_base, n_dn, c - 1, srow,
                                 row_ok, dn_len, GS, BM, BN, TD, TILE_C, GROUP_TILE, ONE, DOT, F32)
                cb, x, st, zt = cbn, xn, stn, ztn
            acc_d = _dn_step(acc_d, cb, x, st, zt, scales_ptr, zeros_ptr, dn_cols_ptr, dn_base, n_dn, c1 - 1, srow,
                             row_ok, dn_len, GS, BM, BN, TD, TILE_C, GROUP_TILE, ONE, DOT, F32)
    else:
        for c in range(c0, c1):
            cb, x, st, zt = _load_dn(dn_codes_ptr, x_ptr, dn_cols_ptr, scales_ptr, zeros_ptr, dn_base, n_dn, c,
                                     dn_crow, srow, dn_len, GS, offs_m, m_ok, row_ok, stride_xm, stride_xk, BM, BN,
                                     TD, TILE_C, EVEN, GROUP_TILE)
            acc_d = _dn_step(acc_d, cb, x, st, zt, scales_ptr, zeros_ptr, dn_cols_ptr, dn_base, n_dn, c, srow, row_ok,
                             dn_len, GS, BM, BN, TD, TILE_C, GROUP_TILE, ONE, DOT, F32)

    if not ONE:
        y = tl.trans(acc_d)  # [BM, BN]
    elif SHARED:
        y = tl.sum(acc_d, 1)[None, :]  # [1, BN]
    else:
        y = (tl.sum(acc, 1) + tl.sum(acc_d, 1))[None, :]
    _write_output(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr + pid, offs_m, m_ok, rows, row_ok, s, M, N, stride_om,
                  SPLIT, HAS_BIAS)


# ---------------------------------------------------------------------------------------- launcher
def default_q4_config(M: int, packed: PackedHybridQ4, dot: bool | None = None) -> dict:
    """Launch parameters for ``M`` tokens (``bm, bn, ts, td, split, pref, warps, dot``). ``dot`` ``None``: tensor
    cores above 4 tokens where the tiles allow 32-row blocks, FMA otherwise. FMA: one token over wide chunks
    (8 rows, 8 2:4 / 4 dense tiles of 128 columns per chunk); several tokens on small row blocks and one tile per
    chunk (the broadcast over the tokens holds ``bn x bm`` products per position). Tensor cores: ``bm >= 16``,
    32-row blocks, chunks of at least 64 2:4 / 32 dense positions."""
    tc = packed.tile_cols
    if dot is None:
        dot = M > 4 and packed.tile_rows % 32 == 0
    if dot:
        return {"bm": _pow2_at_least(M, 16), "bn": 32, "ts": max(1, 64 // tc), "td": max(1, 32 // tc), "split": 1,
                "pref": True, "warps": 4, "dot": True}
    if M == 1:
        return {"bm": 1, "bn": 8, "ts": 8, "td": 4, "split": 1, "pref": False, "warps": 4, "dot": False}
    bm = _pow2_at_least(M)
    return {"bm": bm, "bn": 8 if bm <= 4 else 4, "ts": 1, "td": 1, "split": 1, "pref": True, "warps": 4,
            "dot": False}


def _check_operands(x2: torch.Tensor, packed: PackedHybridQ4, bias: torch.Tensor | None) -> None:
    check_q4_operands(x2, packed, bias, X_DTYPES, MAX_TOKENS, "q4 kernel")
    tc = packed.tile_cols
    if not _is_pow2(tc) or tc < 16:
        raise ValueError(f"q4 kernel: tile width must be a power of two >= 16, got {tc}")


def _fit_blocks(M: int, packed: PackedHybridQ4, cfg: dict) -> dict:
    """``cfg`` checked against ``M`` tokens and the layer's tiles; ``bn`` clamped to a power-of-two divisor of
    the tile height."""
    bm, bn = cfg["bm"], _largest_pow2_divisor_le(packed.tile_rows, cfg["bn"])
    if not _is_pow2(bm) or not M <= bm <= MAX_TOKENS:
        raise ValueError(f"q4 kernel: bm must be a power of two in {M}..{MAX_TOKENS} for {M} tokens, got {bm}")
    if min(cfg["ts"], cfg["td"], cfg["split"], cfg["warps"]) < 1 or not (_is_pow2(cfg["ts"]) and _is_pow2(cfg["td"])):
        raise ValueError(f"q4 kernel: ts, td must be powers of two and split, warps >= 1, got {cfg}")
    tc = packed.tile_cols
    if cfg["dot"] and (bm < 16 or bn < 32 or cfg["ts"] * tc < 64 or cfg["td"] * tc < 32):
        raise ValueError(f"q4 kernel: tensor cores need bm >= 16, 32-row blocks and chunks of >= 64 / 32 columns, "
                         f"got bm={bm}, bn={bn} (tile height {packed.tile_rows}), ts={cfg['ts']}, td={cfg['td']}")
    return {**cfg, "bn": bn}


def q4_linear_triton(x2: torch.Tensor, packed: PackedHybridQ4, bias: torch.Tensor | None = None, *,
                     bm: int | None = None, bn: int | None = None, ts: int | None = None, td: int | None = None,
                     split: int | None = None, pref: bool | None = None, dot: bool | None = None,
                     warps: int | None = None) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` for ``x2 [M, in_features]`` (1..16 tokens; bfloat16, float16, or float32) with
    ``hybrid_q4_kernel``; returns ``[M, out_features]`` in ``x2``'s dtype.

    Parameters left ``None`` come from :func:`default_q4_config`: ``bm`` tokens and ``bn`` weight rows per
    program, ``ts`` / ``td`` 2:4 / dense tiles per chunk, ``split`` programs per row block, ``pref`` (next chunk's
    loads in flight), ``dot`` (tensor cores instead of FMA), ``warps``. Raises a one-line ``ValueError`` /
    ``TypeError`` for operands or block sizes it cannot take.
    """
    _check_operands(x2, packed, bias)
    M, N = x2.shape[0], packed.out_features
    given = {"bm": bm, "bn": bn, "ts": ts, "td": td, "split": split, "pref": pref, "warps": warps}
    cfg = {k: (v if given.get(k) is None else given[k]) for k, v in default_q4_config(M, packed, dot).items()}
    cfg = _fit_blocks(M, packed, cfg)
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    grid0 = packed.grid.n_rows * (packed.tile_rows // cfg["bn"])
    if cfg["split"] > 1:
        ws = _buffer("q4_ws", x2.device, cfg["split"] * M * N, torch.float32)
        cnt = _buffer("q4_cnt", x2.device, grid0, torch.int32)
    else:
        ws = cnt = out  # unused
    hybrid_q4_kernel[(grid0, cfg["split"])](
        x2, out, bias if bias is not None else out, ws, cnt,
        packed.sp_codes, packed.sp_meta, packed.dn_codes, packed.sp_cols, packed.sp_ptr, packed.dn_cols,
        packed.dn_ptr, packed.row_info, packed.q4_info, packed.scales, packed.zeros,
        M, N, packed.n_groups, packed.group_size, x2.stride(0), x2.stride(1), out.stride(0),
        TILE_R=packed.tile_rows, TILE_C=packed.tile_cols, BM=cfg["bm"], BN=cfg["bn"], TS=cfg["ts"], TD=cfg["td"],
        SPLIT=cfg["split"], PREF=bool(cfg["pref"]), DOT=bool(cfg["dot"]),
        GROUP_TILE=packed.group_size % packed.tile_cols == 0, HAS_BIAS=bias is not None,
        F32=interpreting() or x2.dtype == torch.float32, EVEN=packed.in_features % packed.tile_cols == 0,
        num_warps=cfg["warps"], num_stages=1,
    )
    return out


# ---------------------------------------------------------------------------------------- unpack (prefill)
@triton.jit(do_not_specialize=["N", "K", "NG"])
def unpack_q4_kernel(
    out_ptr, sp_codes_ptr, sp_meta_ptr, dn_codes_ptr, kinds_ptr, slot_ptr, row_info_ptr, q4_info_ptr,
    scales_ptr, zeros_ptr, N, K, NG, GS, n_tile_cols,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    """Write the dequantized masked weight ``[N, K]`` (row-major, in ``out``'s dtype) of a 4-bit packed layer;
    one program per ``BN`` rows x one tile. A 2:4 tile's codes are expanded with an offset of one, so that the
    positions the metadata leaves empty read 0 and dequantize to 0. ``ONE_GROUP``: ``BK`` divides the group size,
    so each ``BK``-column chunk lies in one quantization group and a row's scale and zero point are loaded once per
    chunk instead of per element. (The branches name their tensors apart: the compiler, unlike the interpreter,
    merges a name assigned in both branches and needs one shape for it.)"""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    BPT: tl.constexpr = TILE_R // BN
    r = pid_n // BPT
    offs_i = ((pid_n % BPT) * BN + tl.arange(0, BN)).to(tl.int64)
    rows = r * TILE_R + offs_i
    row_ok = rows < N
    kind = tl.load(kinds_ptr + r * n_tile_cols + c).to(tl.int32)
    slot = tl.load(slot_ptr + r * n_tile_cols + c)
    ri = row_info_ptr + r * _RI
    qi = q4_info_ptr + r * 4
    srow = rows * NG
    ar_k = tl.arange(0, BK)
    for kc in range(0, TILE_C, BK):
        cols = c * TILE_C + kc + ar_k
        ok = row_ok[:, None] & (cols[None, :] < K)
        if kind == 2:
            w = tl.zeros((BN, BK), dtype=tl.float32)
        else:
            if ONE_GROUP:
                g1 = (c * TILE_C + kc) // GS
                s = tl.load(scales_ptr + srow + g1, mask=row_ok, other=0.0).to(tl.float32)[:, None]
                z = tl.load(zeros_ptr + srow + g1, mask=row_ok, other=0).to(tl.float32)[:, None]
            else:
                grp = cols // GS
                s = tl.load(scales_ptr + srow[:, None] + grp[None, :], mask=ok, other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + srow[:, None] + grp[None, :], mask=ok, other=0).to(tl.float32)
            if kind == 0:
                kk = slot * TILE_C + kc
                s_codes = _row_block(sp_codes_ptr, tl.load(qi + _QI_SP_OFF), offs_i, tl.load(qi + _QI_SP_STRIDE),
                                     kk // 4, row_ok, BK // 4).to(tl.int32)
                mb = _row_block(sp_meta_ptr, tl.load(ri + _RI_MT_OFF), offs_i, tl.load(ri + _RI_MT_STRIDE), kk // 8,
                                row_ok, BK // 8)
                kept = tl.reshape(tl.join((s_codes & 15) + 1, (s_codes >> 4) + 1), (BN, BK // 2))
                q_sp = _expand24(kept, _nibbles(mb, BN, BK // 4), BN, BK).to(tl.float32)
                w = tl.where(q_sp > 0, (q_sp - 1.0 - z) * s, 0.0)
            else:
                d_codes = _row_block(dn_codes_ptr, tl.load(qi + _QI_DN_OFF), offs_i, tl.load(qi + _QI_DN_STRIDE),
                                     (slot * TILE_C + kc) // 2, row_ok, BK // 2).to(tl.int32)
                q_dn = tl.reshape(tl.join(d_codes & 15, d_codes >> 4), (BN, BK)).to(tl.float32)
                w = (q_dn - z) * s
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def unpack_q4_launch(out: torch.Tensor, tensors, N: int, K: int, tile_rows: int, tile_cols: int, group_size: int,
                     bn: int = 32, bk: int | None = None) -> tuple:
    """``unpack_q4_kernel``'s launch for an ``N x K`` 4-bit layer (``tile_rows x tile_cols`` tiles, groups of
    ``group_size`` columns) writing ``out``: ``(grid, args, constexprs)``, the layer's tensors (stored and derived)
    taken by name from the mapping ``tensors``. ``BN``: the largest power of two dividing the tile height, at most
    ``bn``. ``BK``: the largest power of two dividing the tile width, at most ``bk``; by default at most 128 and,
    where that leaves one of at least 8, dividing the group size too, so that each chunk lies in one group (on an
    NVIDIA H200 at 11008x4096: 32x128 blocks 1.5x faster than 32x64 for groups of 128, 32x32 5.3x faster than
    32x64 for groups of 32; ``benchmarks/q4_prefill.py --blocks``)."""
    bn = _largest_pow2_divisor_le(tile_rows, bn)
    if bk is None:
        bk = _largest_pow2_divisor_le(tile_cols, 128)
        if math.gcd(bk, group_size) >= 8:  # (a power of two, since bk is; bk itself where the group size is a multiple)
            bk = math.gcd(bk, group_size)
    else:
        bk = _largest_pow2_divisor_le(tile_cols, bk)
    if bk < 8:
        raise ValueError(f"unpack_q4_kernel: tile width {tile_cols} has no power-of-two divisor >= 8")
    n_tc = -(-K // tile_cols)
    grid = (-(-N // tile_rows) * (tile_rows // bn), n_tc)
    args = (out, *(tensors[n] for n in UNPACK_TENSORS), N, K, -(-K // group_size), group_size, n_tc)
    return grid, args, {"TILE_R": tile_rows, "TILE_C": tile_cols, "BN": bn, "BK": bk,
                        "ONE_GROUP": group_size % bk == 0}


UNPACK_TENSORS = ("sp_codes", "sp_meta", "dn_codes", "tile_kinds", "tile_slot", "row_info", "q4_info", "scales",
                  "zeros")  # unpack_q4_kernel's tensor arguments after ``out``, in order


def unpack_q4_triton(packed: PackedHybridQ4, out: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                     bn: int = 32, bk: int | None = None) -> torch.Tensor:
    """The dequantized masked weight ``[out_features, in_features]`` written on the layer's device by
    ``unpack_q4_kernel`` into ``out`` (a new ``dtype`` tensor when ``None``). Equals
    :func:`.format_q4.unpack_q4` rounded to the output's dtype."""
    N, K = packed.out_features, packed.in_features
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=packed.device)
    if tuple(out.shape) != (N, K) or not out.is_contiguous():
        raise ValueError(f"unpack_q4_triton: out must be a contiguous [{N}, {K}] tensor, got {tuple(out.shape)}")
    grid, args, consts = unpack_q4_launch(out, vars(packed), N, K, packed.tile_rows, packed.tile_cols,
                                          packed.group_size, bn, bk)
    unpack_q4_kernel[grid](*args, **consts)
    return out


__all__ = ["MAX_TOKENS", "UNPACK_TENSORS", "default_q4_config", "hybrid_q4_kernel", "q4_linear_triton",
           "unpack_q4_kernel", "unpack_q4_launch", "unpack_q4_triton"]
