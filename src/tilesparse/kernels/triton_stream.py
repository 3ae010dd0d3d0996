"""Stream decode kernel for the packed hybrid format: long-lived streaming programs (``hybrid_stream_kernel``).

Why (``benchmarks/decode_probe.py``, H200): a plain Triton GEMV in which each program owns a few rows and
walks the whole K range in large chunks (4-16 KB per program per step), with the next chunk's loads issued
before the current one is used, reads a dense weight as fast as cuBLAS at one token and an all-2:4 weight
1.09-1.35x faster than cuBLAS reads the dense one, whereas short programs (one load phase each) spend
most of their life outside that load phase. This kernel is that structure on the packed format:

* grid ``(row blocks, SPLIT)``: a program owns ``BN`` rows of one tile-row and ``1/SPLIT`` of that
  tile-row's 2:4 chunks and of its dense chunks (a chunk = ``TS`` 2:4 tiles or ``TD`` dense tiles, in the
  order the format stores them, so the values are one contiguous run per row);
* loop over the chunks with the loads of chunk ``i + 1`` (values, metadata, x, column indices) in flight
  while chunk ``i`` is used (``PREF``);
* ``DOT = False`` (one token): fp32 FMA, x picked per kept value with the 2-bit positions (no expansion);
  ``DOT = True`` (up to ``BM`` tokens): the 2:4 values are expanded into four position planes
  ``D_q[n, g]`` (the weight at column ``4g + q``) and ``acc += D_q @ X_q^T`` on tensor cores, ``X_q`` the
  matching strided planes of x; dense tiles are one ``tl.dot`` per chunk. ``ASM`` (GPU, 16-bit types):
  the planes come from shifts of the int32 value pair by ``16 * p`` (inline PTX, 15 integer instructions
  per group) instead of bf16 selects;
* ``SPLIT > 1``: each program stores its fp32 partial sums in its own slice of a workspace and counts its
  arrival per row block; the last to arrive adds the slices, writes the output (+ bias) and resets the counter
  (one launch).

All-zero tiles are stored nowhere and never visited; a tile-row without tiles writes the bias (or zeros).
Loads are masked per tile (``EVEN``: ``in_features`` is a multiple of the tile width, as in every LLM shape,
so the masks are constant over a tile and the loads stay 16 bytes wide) or, with a partial edge tile, per
element against the per-tile-row lengths.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_hybrid import _nibbles, _pick_x, _pos_planes, _write_output, _x_planes


@triton.jit
def _cols(cols_ptr, cbase, ntiles, t0, KC: tl.constexpr, TILE_C: tl.constexpr):
    """Input columns of the ``KC`` positions of a chunk starting at tile ``t0`` of a tile-row's list."""
    p = tl.arange(0, KC)
    t = t0 + p // TILE_C
    col = tl.load(cols_ptr + cbase + t, mask=t < ntiles, other=0) * TILE_C + p % TILE_C
    return tl.max_contiguous(tl.multiple_of(col, TILE_C), TILE_C)  # runs of TILE_C from a tile's base


@triton.jit
def _ok(idx, per_tile: tl.constexpr, t0, ntiles, n_valid, EVEN: tl.constexpr):
    """Which chunk elements ``idx`` (``per_tile`` per tile, counted from tile ``t0``) are stored. EVEN (no
    partial edge tile): a per-tile test, constant over runs of ``per_tile`` so loads stay vectorised;
    otherwise per element against ``n_valid``."""
    if EVEN:
        return t0 + idx // per_tile < ntiles
    else:
        return t0 * per_tile + idx < n_valid


@triton.jit
def _load_x(x_ptr, cols_ptr, cbase, ntiles, t0, n_valid, offs_m, m_ok, stride_xm, stride_xk, BM: tl.constexpr,
            T: tl.constexpr, TILE_C: tl.constexpr, EVEN: tl.constexpr, XT: tl.constexpr):
    """x ``[BM, T * TILE_C]`` at the input columns of the chunk's ``T`` tiles (zero where not stored). XT: one
    column-index load per tile and a ``[BM, T, TILE_C]`` load reshaped; otherwise one index load per position."""
    KC: tl.constexpr = T * TILE_C
    if XT:
        t = t0 + tl.arange(0, T)
        cb = tl.multiple_of(tl.load(cols_ptr + cbase + t, mask=t < ntiles, other=0) * TILE_C, TILE_C)
        q = tl.arange(0, TILE_C)
        ok = m_ok[:, None, None] & (t < ntiles)[None, :, None]
        if not EVEN:
            ok = ok & ((t0 + tl.arange(0, T))[:, None] * TILE_C + q[None, :] < n_valid)[None, :, :]
        x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + (cb[None, :, None] + q[None, None, :]) * stride_xk,
                    mask=ok, other=0.0)
        x = tl.reshape(x, (BM, KC))
    else:
        col = _cols(cols_ptr, cbase, ntiles, t0, KC, TILE_C)
        ok = _ok(tl.arange(0, KC), TILE_C, t0, ntiles, n_valid, EVEN)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk,
                    mask=m_ok[:, None] & ok[None, :], other=0.0)
    return x


@triton.jit
def _load_sp(sp_vals_ptr, sp_vals32_ptr, sp_meta_ptr, x_ptr, cols_ptr, cbase, ntiles, c, vrow, mrow, sp_len,
             offs_m, m_ok, row_ok, stride_xm, stride_xk, BM: tl.constexpr, TS: tl.constexpr, TILE_C: tl.constexpr,
             PAIRS: tl.constexpr, EVEN: tl.constexpr, XT: tl.constexpr):
    """Loads of 2:4 chunk ``c``: values ``[BN, KS/2]`` (int32 pairs ``[BN, KS/4]`` if PAIRS), metadata
    bytes ``[BN, KS/8]``, x ``[BM, KS]``."""
    KS: tl.constexpr = TS * TILE_C
    t0 = c * TS
    if PAIRS:
        j = tl.arange(0, KS // 4)
        ok = _ok(j, TILE_C // 4, t0, ntiles, sp_len // 4, EVEN)
        v = tl.load(sp_vals32_ptr + (vrow // 2)[:, None] + (c * (KS // 4) + j)[None, :],
                    mask=row_ok[:, None] & ok[None, :], other=0)
    else:
        j = tl.arange(0, KS // 2)
        ok = _ok(j, TILE_C // 2, t0, ntiles, sp_len // 2, EVEN)
        v = tl.load(sp_vals_ptr + vrow[:, None] + (c * (KS // 2) + j)[None, :],
                    mask=row_ok[:, None] & ok[None, :], other=0.0)
    jm = tl.arange(0, KS // 8)
    ok = _ok(jm, TILE_C // 8, t0, ntiles, (sp_len + 7) // 8, EVEN)
    mb = tl.load(sp_meta_ptr + mrow[:, None] + (c * (KS // 8) + jm)[None, :], mask=row_ok[:, None] & ok[None, :],
                 other=0)
    x = _load_x(x_ptr, cols_ptr, cbase, ntiles, t0, sp_len, offs_m, m_ok, stride_xm, stride_xk, BM, TS, TILE_C,
                EVEN, XT)
    return v, mb, x


@triton.jit
def _load_dn(dn_vals_ptr, x_ptr, cols_ptr, cbase, ntiles, c, vrow, dn_len, offs_m, m_ok, row_ok,
             stride_xm, stride_xk, BM: tl.constexpr, TD: tl.constexpr, TILE_C: tl.constexpr, EVEN: tl.constexpr,
             XT: tl.constexpr):
    """Loads of dense chunk ``c``: values ``[BN, KD]``, x ``[BM, KD]``."""
    KD: tl.constexpr = TD * TILE_C
    t0 = c * TD
    j = tl.arange(0, KD)
    ok = _ok(j, TILE_C, t0, ntiles, dn_len, EVEN)
    w = tl.load(dn_vals_ptr + vrow[:, None] + (c * KD + j)[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)
    x = _load_x(x_ptr, cols_ptr, cbase, ntiles, t0, dn_len, offs_m, m_ok, stride_xm, stride_xk, BM, TD, TILE_C,
                EVEN, XT)
    return w, x


_SHIFT_ASM = tl.constexpr("""{
        .reg .b32 sa, sb, v0, v1, t0, t1, w01, w23;
        and.b32 sa, $5, 3;
        shl.b32 sa, sa, 4;
        and.b32 sb, $5, 12;
        shl.b32 sb, sb, 2;
        and.b32 v0, $4, 65535;
        shr.u32 v1, $4, 16;
        shl.b32 t0, v0, sa;
        shl.b32 t1, v1, sb;
        or.b32 w01, t0, t1;
        xor.b32 sa, sa, 32;
        xor.b32 sb, sb, 32;
        shl.b32 t0, v0, sa;
        shl.b32 t1, v1, sb;
        or.b32 w23, t0, t1;
        mov.b32 {$0, $1}, w01;
        mov.b32 {$2, $3}, w23;
        }""")


@triton.jit
def _expand_shift(v32, code, BF16: tl.constexpr):
    """Inline PTX: int32 value pair ``v0 | v1 << 16`` + code -> the group's four 16-bit weights
    (``v0 << 16 p0 | v1 << 16 p1`` as 64 bits; shifts of 32 or more give zero)."""
    if BF16:
        return tl.inline_asm_elementwise(_SHIFT_ASM, "=h,=h,=h,=h,r,r", [v32, code],
                                         dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_SHIFT_ASM, "=h,=h,=h,=h,r,r", [v32, code],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                         is_pure=True, pack=1)


@triton.jit
def _dot_acc(acc, a, x, F32: tl.constexpr):
    """acc[BN, BM] += a[BN, k] @ x[BM, k]^T (fp32 operands on the CPU interpreter, which has no bf16 dot)."""
    if F32:
        acc += tl.dot(a.to(tl.float32), tl.trans(x.to(tl.float32)))
    else:
        acc += tl.dot(a, tl.trans(x))
    return acc


@triton.jit
def _sp_step(acc, v, mb, x, BM: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr, DOT: tl.constexpr,
             ASM: tl.constexpr, F32: tl.constexpr, DT: tl.constexpr):
    G: tl.constexpr = KS // 4
    code = _nibbles(mb, BN, G)
    if DOT:
        x0, x1, x2, x3 = _x_planes(x, BM, G)
        if ASM:
            d0, d1, d2, d3 = _expand_shift(v, code, DT == tl.bfloat16)
        else:
            v0, v1 = tl.split(tl.reshape(v, (BN, G, 2)))
            d0, d1, d2, d3 = _pos_planes(v0, v1, code & 3, code >> 2)
        acc = _dot_acc(acc, d0, x0, F32)
        acc = _dot_acc(acc, d1, x1, F32)
        acc = _dot_acc(acc, d2, x2, F32)
        acc = _dot_acc(acc, d3, x3, F32)
    else:  # one token: acc[BN, G] += v0 * x[4g + p0] + v1 * x[4g + p1]
        x0, x1, x2, x3 = _x_planes(x.to(tl.float32), 1, G)
        v0, v1 = tl.split(tl.reshape(v, (BN, G, 2)))
        xs0, xs1 = _pick_x(code & 3, code >> 2, x0, x1, x2, x3)
        acc += v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1
    return acc


@triton.jit
def _dn_step(acc, w, x, DOT: tl.constexpr, F32: tl.constexpr):
    if DOT:
        acc = _dot_acc(acc, w, x, F32)
    else:
        acc += w.to(tl.float32) * x.to(tl.float32)  # x [1, KD] broadcast over the rows
    return acc


@triton.jit(do_not_specialize=["M", "N"])
def hybrid_stream_kernel(
    x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
    sp_vals_ptr, sp_vals32_ptr, sp_meta_ptr, dn_vals_ptr, sp_cols_ptr, sp_ptr_ptr, dn_cols_ptr, dn_ptr_ptr,
    row_info_ptr,
    M, N, stride_xm, stride_xk, stride_om,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TS: tl.constexpr,
    TD: tl.constexpr, SPLIT: tl.constexpr, PREF: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
    HAS_BIAS: tl.constexpr, F32: tl.constexpr, EVEN: tl.constexpr, XT: tl.constexpr = False,
):
    """``Y = X @ W^T (+ bias)`` for ``M <= BM`` tokens (``BM = 1`` unless ``DOT``); see the module docstring."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    NB: tl.constexpr = TILE_R // BN
    r = pid // NB
    row0 = r * TILE_R + (pid % NB) * BN
    offs_n = tl.arange(0, BN)
    rows = row0 + offs_n
    row_ok = rows < N
    rr = ((pid % NB) * BN + offs_n).to(tl.int64)  # row inside the tile-row
    offs_m = tl.arange(0, BM)
    m_ok = offs_m < M
    DT: tl.constexpr = sp_vals_ptr.dtype.element_ty
    KS: tl.constexpr = TS * TILE_C
    KD: tl.constexpr = TD * TILE_C

    ri = row_info_ptr + r * 8
    sp_len = tl.load(ri + 0)
    sp_vrow = tl.multiple_of(tl.load(ri + 1) + rr * tl.load(ri + 2), 8)
    sp_mrow = tl.multiple_of(tl.load(ri + 3) + rr * tl.load(ri + 4), 16)
    dn_len = tl.load(ri + 5)
    dn_vrow = tl.multiple_of(tl.load(ri + 6) + rr * tl.load(ri + 7), 8)
    sp_base = tl.load(sp_ptr_ptr + r)
    n_sp = tl.load(sp_ptr_ptr + r + 1) - sp_base
    dn_base = tl.load(dn_ptr_ptr + r)
    n_dn = tl.load(dn_ptr_ptr + r + 1) - dn_base

    if DOT:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, KS // 4), dtype=tl.float32)
    SHARED: tl.constexpr = DOT or KD == KS // 4  # one accumulator for both kinds of chunks

    # ---- 2:4 chunks of this program
    nsc = tl.cdiv(n_sp, TS)
    per = tl.cdiv(nsc, SPLIT)
    c0 = s * per
    c1 = tl.minimum(c0 + per, nsc)
    if PREF:
        if c0 < c1:
            v, mb, x = _load_sp(sp_vals_ptr, sp_vals32_ptr, sp_meta_ptr, x_ptr, sp_cols_ptr, sp_base, n_sp, c0,
                                sp_vrow, sp_mrow, sp_len, offs_m, m_ok, row_ok, stride_xm, stride_xk, BM, TS, TILE_C,
                                ASM and DOT, EVEN, XT)
            for c in range(c0 + 1, c1):
                vn, mbn, xn = _load_sp(sp_vals_ptr, sp_vals32_ptr, sp_meta_ptr, x_ptr, sp_cols_ptr, sp_base, n_sp,
                                       c, sp_vrow, sp_mrow, sp_len, offs_m, m_ok, row_ok, stride_xm, stride_xk, BM,
                                       TS, TILE_C, ASM and DOT, EVEN, XT)
                acc = _sp_step(acc, v, mb, x, BM, BN, KS, DOT, ASM, F32, DT)
                v, mb, x = vn, mbn, xn
            acc = _sp_step(acc, v, mb, x, BM, BN, KS, DOT, ASM, F32, DT)
    else:
        for c in range(c0, c1):
            v, mb, x = _load_sp(sp_vals_ptr, sp_vals32_ptr, sp_meta_ptr, x_ptr, sp_cols_ptr, sp_base, n_sp, c,
                                sp_vrow, sp_mrow, sp_len, offs_m, m_ok, row_ok, stride_xm, stride_xk, BM, TS, TILE_C,
                                ASM and DOT, EVEN, XT)
            acc = _sp_step(acc, v, mb, x, BM, BN, KS, DOT, ASM, F32, DT)

    # ---- dense chunks of this program
    ndc = tl.cdiv(n_dn, TD)
    per = tl.cdiv(ndc, SPLIT)
    c0 = s * per
    c1 = tl.minimum(c0 + per, ndc)
    if SHARED:
        acc_d = acc
    else:
        acc_d = tl.zeros((BN, KD), dtype=tl.float32)
    if PREF:
        if c0 < c1:
            w, x = _load_dn(dn_vals_ptr, x_ptr, dn_cols_ptr, dn_base, n_dn, c0, dn_vrow, dn_len, offs_m, m_ok,
                            row_ok, stride_xm, stride_xk, BM, TD, TILE_C, EVEN, XT)
            for c in range(c0 + 1, c1):
                wn, xn = _load_dn(dn_vals_ptr, x_ptr, dn_cols_ptr, dn_base, n_dn, c, dn_vrow, dn_len, offs_m,
                                  m_ok, row_ok, stride_xm, stride_xk, BM, TD, TILE_C, EVEN, XT)
                acc_d = _dn_step(acc_d, w, x, DOT, F32)
                w, x = wn, xn
            acc_d = _dn_step(acc_d, w, x, DOT, F32)
    else:
        for c in range(c0, c1):
            w, x = _load_dn(dn_vals_ptr, x_ptr, dn_cols_ptr, dn_base, n_dn, c, dn_vrow, dn_len, offs_m, m_ok,
                            row_ok, stride_xm, stride_xk, BM, TD, TILE_C, EVEN, XT)
            acc_d = _dn_step(acc_d, w, x, DOT, F32)

    if DOT:
        y = tl.trans(acc_d)  # [BM, BN]
    elif SHARED:
        y = tl.sum(acc_d, 1)[None, :]  # [1, BN]
    else:
        y = (tl.sum(acc, 1) + tl.sum(acc_d, 1))[None, :]

    # split-K: per-split workspace slices, last arriver adds them (fp32 atomics into one workspace give rare wrong
    # sums on the H200 with fewer tokens than BM, not root-caused; the slices gave none in 420 repeated launches
    # of the same configurations)
    _write_output(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr + pid, offs_m, m_ok, rows, row_ok, s, M, N, stride_om,
                  SPLIT, HAS_BIAS)
