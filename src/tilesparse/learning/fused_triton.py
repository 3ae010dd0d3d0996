"""Fused Triton construction of a layer's masked weight ``W * M`` (forward and backward, one kernel each).

The torch path (:mod:`.relax`: :func:`~.relax.fused_soft_24`, :func:`~.relax.joint_masked_weight`,
:func:`~.relax.tile_scaled_weight`, with the noise of :func:`~.relax.gumbel_noise`) builds the mask in many
elementwise passes over ``[6, out, in/4]`` fp32 tensors. Here one forward kernel reads ``W`` and the pattern
logits once and writes ``W * M`` in ``W``'s dtype:

- Gumbel noise generated in registers from Philox bits (``tl.randint4x(seed, counter)``, two calls per group of
  4 weights for its 6 candidates; :func:`gumbel_noise_from_seed` writes the same noise, for tests);
- the softmax over the 6 candidates (``hard``: one-hot argmax forward, soft gradient: straight-through);
- the soft 2:4 mask, the tile mix ``T + (1 - T) * M24`` (PATCH-Joint; MaskLLM has no ``T``) or, for
  PATCH-Tile, ``where(keep24, W, W * T)`` from the fixed pattern ids;
- optionally the sum of squares of ``W * M`` (the magnitude regulariser's norm), as per-program partials.

One backward kernel recomputes the probabilities from the same seed (the noise is never stored) and writes
``d(pattern logits)`` and per-program partial sums of ``d T``; every program lies inside one tile, and the
partials are reduced by a fixed-order torch sum (deterministic, no atomics).

Per-tile values ``T`` (a binary concrete sample of ``[n_rows, n_cols]`` logits) stay in torch: they are tiny.
The seed is one ``torch.randint`` draw from the weight device's generator per call, kept on the device (no
host sync), so checkpointed RNG state (trainer resume, gradient checkpointing) reproduces the noise.

Triton is imported by this module; import it only where Triton is installed (see :func:`available`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..masks.nm import GROUP, N_PATTERNS
from ..masks.tiles import TileGrid
from ..settings import setting

_EPS = 1e-6
# 4-bit keep code (bit j = position j kept) of pattern id i in nibble i: ids 0..5 = 1100,1010,1001,0110,0101,0011
_CODES = tl.constexpr(3 | (5 << 4) | (9 << 8) | (6 << 12) | (10 << 16) | (12 << 20))
_MAX_INDEX = 2**31 - 1


def interpreted() -> bool:
    """True when this module's kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1`` set
    before Triton was first imported in this process)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on tensors of ``device`` (CUDA, or any device under the interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreted()


# -- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _gumbel(x):
    """Standard Gumbel sample from random bits ``x`` (uint32): ``-log(-log(u))``, ``u`` clamped as in torch."""
    u = tl.uint_to_uniform_float(x)
    u = tl.minimum(tl.maximum(u, 1e-6), 1.0 - 1e-6)
    return -tl.log(-tl.log(u))


@triton.jit
def _gumbel6(seed, off):
    """Six Gumbel planes for the groups at linear group index ``off`` (``row * in/4 + group``): two Philox
    calls per group (``tl.randint4x`` at counters ``2 off`` and ``2 off + 1``), not six ``tl.rand`` calls."""
    a0, a1, a2, a3 = tl.randint4x(seed, 2 * off)
    b0, b1, _, _ = tl.randint4x(seed, 2 * off + 1)
    return _gumbel(a0), _gumbel(a1), _gumbel(a2), _gumbel(a3), _gumbel(b0), _gumbel(b1)


@triton.jit
def _probs(lg_ptr, plane, off, m2, seed, sot, inv_tau, NOISE: tl.constexpr):
    """Softmax over the six candidates of ``(k * logits + gumbel) / tau`` on a ``[BLOCK_R, BLOCK_G]`` block."""
    z0 = tl.load(lg_ptr + off, mask=m2, other=0.0) * sot
    z1 = tl.load(lg_ptr + plane + off, mask=m2, other=0.0) * sot
    z2 = tl.load(lg_ptr + 2 * plane + off, mask=m2, other=0.0) * sot
    z3 = tl.load(lg_ptr + 3 * plane + off, mask=m2, other=0.0) * sot
    z4 = tl.load(lg_ptr + 4 * plane + off, mask=m2, other=0.0) * sot
    z5 = tl.load(lg_ptr + 5 * plane + off, mask=m2, other=0.0) * sot
    if NOISE:
        n0, n1, n2, n3, n4, n5 = _gumbel6(seed, off)
        z0 += n0 * inv_tau
        z1 += n1 * inv_tau
        z2 += n2 * inv_tau
        z3 += n3 * inv_tau
        z4 += n4 * inv_tau
        z5 += n5 * inv_tau
    mx = tl.maximum(tl.maximum(tl.maximum(z0, z1), tl.maximum(z2, z3)), tl.maximum(z4, z5))
    e0 = tl.exp(z0 - mx)
    e1 = tl.exp(z1 - mx)
    e2 = tl.exp(z2 - mx)
    e3 = tl.exp(z3 - mx)
    e4 = tl.exp(z4 - mx)
    e5 = tl.exp(z5 - mx)
    r = 1.0 / (e0 + e1 + e2 + e3 + e4 + e5)
    return e0 * r, e1 * r, e2 * r, e3 * r, e4 * r, e5 * r


@triton.jit
def _take_if_greater(best, idx, y, k: tl.constexpr):
    """(best, idx) updated with candidate ``k`` of value ``y`` where it is strictly greater."""
    upd = y > best
    return tl.where(upd, y, best), tl.where(upd, k, idx)


@triton.jit
def _argmax6(y0, y1, y2, y3, y4, y5):
    """Index of the first maximum (as ``torch.argmax``)."""
    best, idx = _take_if_greater(y0, tl.zeros(y0.shape, tl.int32), y1, 1)
    best, idx = _take_if_greater(best, idx, y2, 2)
    best, idx = _take_if_greater(best, idx, y3, 3)
    best, idx = _take_if_greater(best, idx, y4, 4)
    best, idx = _take_if_greater(best, idx, y5, 5)
    return idx


@triton.jit
def _keep_from_id(idx):
    """Per-position keep values (fp32 0/1) of pattern ids ``idx`` (int32)."""
    code = (tl.full(idx.shape, _CODES, tl.int32) >> (idx * 4)) & 0xF
    return ((code & 1) != 0).to(tl.float32), ((code & 2) != 0).to(tl.float32), \
        ((code & 4) != 0).to(tl.float32), ((code & 8) != 0).to(tl.float32)


@triton.jit
def _interleave(m0, m1, m2, m3, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Four ``[R, G]`` position planes -> ``[R, 4G]`` with column ``4g + j`` = plane ``j``."""
    x = tl.join(tl.join(m0, m2), tl.join(m1, m3))  # [R, G, i, k] = plane 2i + k
    return tl.reshape(x, (BLOCK_R, 4 * BLOCK_G))


@triton.jit
def _split4(x, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Inverse of :func:`_interleave`."""
    a, b = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_G, 2, 2)))
    p0, p2 = tl.split(a)
    p1, p3 = tl.split(b)
    return p0, p1, p2, p3


@triton.jit
def _mask24(lg_ptr, ids_ptr, plane, off2, m2, seed, sot, inv_tau,
            FIXED: tl.constexpr, NOISE: tl.constexpr, HARD: tl.constexpr):
    """Forward 2:4 mask planes (m0..m3) and the soft probabilities (y0..y5; zeros for fixed ids)."""
    if FIXED:
        idx = tl.load(ids_ptr + off2, mask=m2, other=0).to(tl.int32)
        m0, m1, m2_, m3 = _keep_from_id(idx)
        y0 = tl.zeros(m0.shape, tl.float32)
        y1 = y0
        y2 = y0
        y3 = y0
        y4 = y0
        y5 = y0
    else:
        y0, y1, y2, y3, y4, y5 = _probs(lg_ptr, plane, off2, m2, seed, sot, inv_tau, NOISE)
        if HARD:
            # one-hot argmax; the 2:4 pattern of the winning candidate
            m0, m1, m2_, m3 = _keep_from_id(_argmax6(y0, y1, y2, y3, y4, y5))
        else:
            # position j is kept by the candidates {0,1,2}, {0,3,4}, {1,3,5}, {2,4,5}
            m0 = y0 + y1 + y2
            m1 = y0 + y3 + y4
            m2_ = y1 + y3 + y5
            m3 = y2 + y4 + y5
    return m0, m1, m2_, m3, y0, y1, y2, y3, y4, y5


@triton.jit
def _block(n_out, n_grp, tile_r, tile_g, sub_r, sub_g, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Rows, groups, columns and masks of this program (every program lies inside one tile)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    ti = pid_r // sub_r
    tj = pid_c // sub_g
    r0 = ti * tile_r + (pid_r % sub_r) * BLOCK_R
    g0 = tj * tile_g + (pid_c % sub_g) * BLOCK_G
    r_end = tl.minimum((ti + 1) * tile_r, n_out)
    g_end = tl.minimum((tj + 1) * tile_g, n_grp)
    rows = r0 + tl.arange(0, BLOCK_R)
    grps = g0 + tl.arange(0, BLOCK_G)
    cols = g0 * 4 + tl.arange(0, 4 * BLOCK_G)
    rm = rows < r_end
    m2 = rm[:, None] & (grps < g_end)[None, :]
    mw = rm[:, None] & (cols < g_end * 4)[None, :]
    off2 = rows[:, None] * n_grp + grps[None, :]
    return pid_r, pid_c, ti, tj, rows, cols, m2, mw, off2


@triton.jit
def _program_mask(lg_ptr, ids_ptr, t_ptr, t_stride, seed_ptr, ti, tj, plane, off2, m2, sot, inv_tau,
                  FIXED: tl.constexpr, HAS_T: tl.constexpr, NOISE: tl.constexpr, HARD: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """This program's mask ``T + (1 - T) M24`` (or ``M24``), its 2:4 part ``M24`` ``[R, 4G]``, the tile value
    ``T`` (0.0 without tiles) and the candidate probabilities y0..y5 (same seed -> same noise in fwd and bwd)."""
    seed = 0
    if NOISE:
        seed = tl.load(seed_ptr)
    m0, m1, m2_, m3, y0, y1, y2, y3, y4, y5 = _mask24(lg_ptr, ids_ptr, plane, off2, m2, seed, sot, inv_tau,
                                                      FIXED, NOISE, HARD)
    m24 = _interleave(m0, m1, m2_, m3, BLOCK_R, BLOCK_G)
    if HAS_T:
        t = tl.load(t_ptr + ti * t_stride + tj).to(tl.float32)
        mask = t + (1.0 - t) * m24
    else:
        t = 0.0
        mask = m24
    return mask, m24, t, y0, y1, y2, y3, y4, y5


@triton.jit
def _fwd_kernel(w_ptr, swr, swc, lg_ptr, ids_ptr, t_ptr, t_stride, seed_ptr, out_ptr, sq_ptr,
                n_out, n_in, n_grp, tile_r, tile_g, sub_r, sub_g, n_pc, sot, inv_tau,
                FIXED: tl.constexpr, HAS_T: tl.constexpr, NOISE: tl.constexpr, HARD: tl.constexpr,
                RECORD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_r, pid_c, ti, tj, rows, cols, m2, mw, off2 = _block(n_out, n_grp, tile_r, tile_g, sub_r, sub_g,
                                                             BLOCK_R, BLOCK_G)
    plane = n_out * n_grp
    mask, m24, t, y0, y1, y2, y3, y4, y5 = _program_mask(lg_ptr, ids_ptr, t_ptr, t_stride, seed_ptr, ti, tj, plane,
                                                         off2, m2, sot, inv_tau, FIXED, HAS_T, NOISE, HARD,
                                                         BLOCK_R, BLOCK_G)
    w = tl.load(w_ptr + rows[:, None] * swr + cols[None, :] * swc, mask=mw, other=0.0).to(tl.float32)
    out = (w * mask).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * n_in + cols[None, :], out, mask=mw)
    if RECORD:
        o = out.to(tl.float32)
        tl.store(sq_ptr + pid_r * n_pc + pid_c, tl.sum(tl.sum(o * o, axis=1), axis=0))


@triton.jit
def _bwd_kernel(g_ptr, sgr, sgc, w_ptr, swr, swc, lg_ptr, ids_ptr, t_ptr, t_stride, seed_ptr, gsq_ptr,
                dlg_ptr, dt_ptr, n_out, n_in, n_grp, tile_r, tile_g, sub_r, sub_g, n_pc, sot, inv_tau,
                FIXED: tl.constexpr, HAS_T: tl.constexpr, NOISE: tl.constexpr, HARD: tl.constexpr,
                RECORD: tl.constexpr, NEED_DL: tl.constexpr, NEED_DT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_r, pid_c, ti, tj, rows, cols, m2, mw, off2 = _block(n_out, n_grp, tile_r, tile_g, sub_r, sub_g,
                                                             BLOCK_R, BLOCK_G)
    plane = n_out * n_grp
    mask, m24, t, y0, y1, y2, y3, y4, y5 = _program_mask(lg_ptr, ids_ptr, t_ptr, t_stride, seed_ptr, ti, tj, plane,
                                                         off2, m2, sot, inv_tau, FIXED, HAS_T, NOISE, HARD,
                                                         BLOCK_R, BLOCK_G)
    w = tl.load(w_ptr + rows[:, None] * swr + cols[None, :] * swc, mask=mw, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * sgr + cols[None, :] * sgc, mask=mw, other=0.0).to(tl.float32)
    if RECORD:  # d(sum (W M)^2) / d(W M) = 2 W M (of the stored, rounded value)
        wm = (w * mask).to(w_ptr.dtype.element_ty).to(tl.float32)
        g += 2.0 * tl.load(gsq_ptr) * wm
    gw = g * w  # d loss / d M
    if NEED_DT:
        dt = tl.sum(tl.sum(gw * (1.0 - m24), axis=1), axis=0)
        tl.store(dt_ptr + pid_r * n_pc + pid_c, dt)
    if NEED_DL:
        if HAS_T:
            dm = gw * (1.0 - t)
        else:
            dm = gw
        d0, d1, d2, d3 = _split4(dm, BLOCK_R, BLOCK_G)  # d loss / d M24 per position
        # d loss / d y_c = sum over the two positions candidate c keeps
        a0 = d0 + d1
        a1 = d0 + d2
        a2 = d0 + d3
        a3 = d1 + d2
        a4 = d1 + d3
        a5 = d2 + d3
        s = y0 * a0 + y1 * a1 + y2 * a2 + y3 * a3 + y4 * a4 + y5 * a5
        base = dlg_ptr + off2
        tl.store(base, y0 * (a0 - s) * sot, mask=m2)
        tl.store(base + plane, y1 * (a1 - s) * sot, mask=m2)
        tl.store(base + 2 * plane, y2 * (a2 - s) * sot, mask=m2)
        tl.store(base + 3 * plane, y3 * (a3 - s) * sot, mask=m2)
        tl.store(base + 4 * plane, y4 * (a4 - s) * sot, mask=m2)
        tl.store(base + 5 * plane, y5 * (a5 - s) * sot, mask=m2)


@triton.jit
def _noise_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    n0, n1, n2, n3, n4, n5 = _gumbel6(tl.load(seed_ptr), offs)
    tl.store(out_ptr + offs, n0, mask=m)
    tl.store(out_ptr + n + offs, n1, mask=m)
    tl.store(out_ptr + 2 * n + offs, n2, mask=m)
    tl.store(out_ptr + 3 * n + offs, n3, mask=m)
    tl.store(out_ptr + 4 * n + offs, n4, mask=m)
    tl.store(out_ptr + 5 * n + offs, n5, mask=m)


# -- launch geometry ----------------------------------------------------------------------------------
def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class _Launch:
    grid: TileGrid
    has_t: bool
    fixed: bool
    noise: bool
    hard: bool
    record: bool
    sot: float
    inv_tau: float
    block_r: int
    block_g: int
    tile_r: int
    tile_g: int
    sub_r: int
    sub_g: int
    n_tr: int
    n_tc: int
    num_warps: int = 4

    @property
    def programs(self) -> tuple[int, int]:
        return self.n_tr * self.sub_r, self.n_tc * self.sub_g

    @property
    def n_grp(self) -> int:
        return self.grid.in_features // GROUP


DEFAULT_BLOCKS = (32, 32, 8)  # rows, groups of 4 columns, warps per program (best of 3 measured on an H200)


def blocks() -> tuple[int, int, int]:
    """Program block (rows, groups, warps): :data:`DEFAULT_BLOCKS` or ``TILESPARSE_FUSED_BLOCKS=r,g,w``."""
    return setting("fused_blocks") or DEFAULT_BLOCKS


def _geometry(grid: TileGrid, *, has_t: bool, fixed: bool, noise: bool, hard: bool, record: bool,
              scale: float, tau: float) -> _Launch:
    block_r, block_g, num_warps = blocks()
    n_out, n_grp = grid.out_features, grid.in_features // GROUP
    if has_t:
        tile_r, tile_g = grid.tile_rows, grid.tile_cols // GROUP
        br = min(block_r, _pow2_ceil(tile_r))
        bg = min(block_g, _pow2_ceil(tile_g))
        sub_r, sub_g = triton.cdiv(tile_r, br), triton.cdiv(tile_g, bg)
    else:  # no tiles: a plain grid of blocks
        br, bg = block_r, 2 * block_g
        tile_r, tile_g, sub_r, sub_g = br, bg, 1, 1
    return _Launch(grid, has_t, fixed, noise, hard, record, float(scale) / float(tau), 1.0 / float(tau),
                   br, bg, tile_r, tile_g, sub_r, sub_g, triton.cdiv(n_out, tile_r), triton.cdiv(n_grp, tile_g),
                   num_warps)


def _reduce_partials(part: torch.Tensor, g: _Launch) -> torch.Tensor:
    """Per-program partials ``[n_tr*sub_r, n_tc*sub_g]`` -> per tile ``[n_tr, n_tc]`` (fixed order)."""
    return part.view(g.n_tr, g.sub_r, g.n_tc, g.sub_g).sum(dim=(1, 3))


def _forward(weight, logits, tiles, ids, seed, g: _Launch):
    n_out, n_in = weight.shape
    out = torch.empty((n_out, n_in), device=weight.device, dtype=weight.dtype)
    pr, pc = g.programs
    sq = torch.empty((pr, pc), device=weight.device, dtype=torch.float32) if g.record else out
    dummy = weight
    _fwd_kernel[(pr, pc)](
        weight, weight.stride(0), weight.stride(1),
        logits if logits is not None else dummy, ids if ids is not None else dummy,
        tiles if tiles is not None else dummy, tiles.stride(0) if tiles is not None else 0,
        seed if seed is not None else dummy, out, sq,
        n_out, n_in, g.n_grp, g.tile_r, g.tile_g, g.sub_r, g.sub_g, pc, g.sot, g.inv_tau,
        FIXED=g.fixed, HAS_T=g.has_t, NOISE=g.noise, HARD=g.hard, RECORD=g.record,
        BLOCK_R=g.block_r, BLOCK_G=g.block_g, num_warps=g.num_warps)
    return out, (sq.sum() if g.record else None)


def _backward(grad, g_sq, weight, logits, tiles, ids, seed, g: _Launch, need_dl: bool, need_dt: bool):
    n_out, n_in = weight.shape
    pr, pc = g.programs
    dl = torch.empty_like(logits) if need_dl else None
    dt = torch.empty((pr, pc), device=weight.device, dtype=torch.float32) if need_dt else None
    record = g.record and g_sq is not None
    gsq = g_sq.reshape(1).to(torch.float32) if record else None
    dummy = weight
    _bwd_kernel[(pr, pc)](
        grad, grad.stride(0), grad.stride(1), weight, weight.stride(0), weight.stride(1),
        logits if logits is not None else dummy, ids if ids is not None else dummy,
        tiles if tiles is not None else dummy, tiles.stride(0) if tiles is not None else 0,
        seed if seed is not None else dummy, gsq if record else dummy,
        dl if need_dl else dummy, dt if need_dt else dummy,
        n_out, n_in, g.n_grp, g.tile_r, g.tile_g, g.sub_r, g.sub_g, pc, g.sot, g.inv_tau,
        FIXED=g.fixed, HAS_T=g.has_t, NOISE=g.noise, HARD=g.hard, RECORD=record, NEED_DL=need_dl,
        NEED_DT=need_dt, BLOCK_R=g.block_r, BLOCK_G=g.block_g, num_warps=g.num_warps)
    dt_tiles = _reduce_partials(dt, g).to(tiles.dtype) if need_dt else None
    return dl, dt_tiles


class _FusedMaskedWeight(torch.autograd.Function):
    """``(W * M, sum((W * M)^2))`` with gradients to the pattern logits and the tile values only."""

    @staticmethod
    def forward(ctx, weight, logits, tiles, ids, seed, launch):
        out, sq = _forward(weight, logits, tiles, ids, seed, launch)
        ctx.save_for_backward(weight, logits, tiles, ids, seed)
        ctx.launch = launch
        ctx.set_materialize_grads(False)
        if sq is None:
            sq = torch.zeros((), device=weight.device, dtype=torch.float32)
            ctx.mark_non_differentiable(sq)
        return out, sq

    @staticmethod
    def backward(ctx, grad, g_sq):
        weight, logits, tiles, ids, seed = ctx.saved_tensors
        g: _Launch = ctx.launch
        need_dl = bool(ctx.needs_input_grad[1]) and logits is not None
        need_dt = bool(ctx.needs_input_grad[2]) and tiles is not None
        if (grad is None and g_sq is None) or not (need_dl or need_dt):
            return None, None, None, None, None, None
        if grad is None:
            grad = torch.zeros_like(weight)
        dl, dt = _backward(grad, g_sq, weight, logits, tiles, ids, seed, g, need_dl, need_dt)
        return None, dl, dt, None, None, None


# -- public API -----------------------------------------------------------------------------------------
def draw_seed(device: torch.device | str) -> torch.Tensor:
    """One seed (int64 tensor of one element on ``device``) drawn from torch's generator of that device."""
    return torch.randint(0, _MAX_INDEX, (1,), device=device, dtype=torch.int64)


def supports(weight: torch.Tensor, grid: TileGrid) -> bool:
    """Whether the fused kernels handle this weight (2-D, in % 4 == 0, int32 indexing, frozen)."""
    return (weight.dim() == 2 and weight.shape[1] % GROUP == 0 and not weight.requires_grad
            and N_PATTERNS * weight.numel() // GROUP < _MAX_INDEX
            and (weight.shape[0] - 1) * abs(weight.stride(0)) + (weight.shape[1] - 1) * abs(weight.stride(1))
            < _MAX_INDEX and tuple(weight.shape) == (grid.out_features, grid.in_features))


def fused_masked_weight(weight: torch.Tensor, grid: TileGrid, *, logits: torch.Tensor | None = None,
                        tiles: torch.Tensor | None = None, ids: torch.Tensor | None = None, scale: float = 1.0,
                        tau: float = 1.0, hard: bool = False, noise: bool = True,
                        seed: torch.Tensor | int | None = None,
                        record_sq: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked weight ``W * M`` in ``W``'s dtype, built by one Triton kernel (and one in backward).

    - PATCH-Joint: ``logits`` (candidate-major ``[6, out, in/4]`` fp32) and ``tiles`` (``[n_rows, n_cols]``
      tile values ``T``): ``M = T + (1 - T) * M24`` with ``M24`` the Gumbel-softmax soft 2:4 mask of
      ``scale * logits`` at temperature ``tau`` (``hard``: one-hot forward, soft gradient);
    - MaskLLM: ``logits`` only, ``M = M24``;
    - PATCH-Tile: ``ids`` (``[out, in/4]`` uint8 fixed pattern ids) and ``tiles``: kept weights stay, the
      others are scaled by their tile's ``T``.

    ``noise``: sample Gumbel noise from ``seed`` (an int, a one-element int64 device tensor, or ``None``: one
    draw of torch's generator of ``weight.device``). Returns ``(W * M, sum((W * M)^2))`` (the second ``None``
    unless ``record_sq``); gradients reach ``logits`` and ``tiles``. Values equal the torch compositions of
    :mod:`.relax` with the noise :func:`gumbel_noise_from_seed` writes.
    """
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    if (logits is None) == (ids is None):
        raise ValueError("give exactly one of pattern logits and fixed ids")
    if ids is not None and tiles is None:
        raise ValueError("fixed 2:4 ids need tile values")
    n_out, n_in = weight.shape
    n_grp = n_in // GROUP
    if logits is not None:
        if tuple(logits.shape) != (N_PATTERNS, n_out, n_grp):
            raise ValueError(f"pattern logits {tuple(logits.shape)} != {(N_PATTERNS, n_out, n_grp)}")
        logits = logits if logits.is_contiguous() else logits.contiguous()
    if ids is not None:
        if tuple(ids.shape) != (n_out, n_grp):
            raise ValueError(f"ids {tuple(ids.shape)} != {(n_out, n_grp)}")
        ids = ids.contiguous()
    if tiles is not None:
        if tuple(tiles.shape) != grid.shape:
            raise ValueError(f"tile values {tuple(tiles.shape)} != grid {grid.shape}")
        if tiles.stride(1) != 1:
            tiles = tiles.contiguous()
    noise = bool(noise) and logits is not None
    if noise:
        if seed is None:
            seed = draw_seed(weight.device)
        elif not torch.is_tensor(seed):
            seed = torch.tensor([int(seed)], device=weight.device, dtype=torch.int64)
    else:
        seed = None
    g = _geometry(grid, has_t=tiles is not None, fixed=ids is not None, noise=noise, hard=bool(hard) and logits
                  is not None, record=bool(record_sq), scale=scale, tau=tau)
    out, sq = _FusedMaskedWeight.apply(weight, logits, tiles, ids, seed, g)
    return out, (sq if record_sq else None)


def gumbel_noise_from_seed(seed: torch.Tensor | int, shape, device=None) -> torch.Tensor:
    """The Gumbel noise (fp32, ``shape`` = the logits' ``[6, out, in/4]``) that the fused kernels draw for
    ``seed`` (a debugging / test aid): group ``i = row * in/4 + group`` takes candidates 0-3 from
    ``tl.randint4x(seed, 2 i)`` and 4-5 from ``tl.randint4x(seed, 2 i + 1)``."""
    if not torch.is_tensor(seed):
        seed = torch.tensor([int(seed)], device=device, dtype=torch.int64)
    shape = tuple(shape)
    if len(shape) < 2 or shape[0] != N_PATTERNS:
        raise ValueError(f"shape must be [6, ...], got {shape}")
    out = torch.empty(shape, device=seed.device, dtype=torch.float32)
    n = out.numel() // N_PATTERNS
    block = 1024
    _noise_kernel[(triton.cdiv(n, block),)](seed, out, n, BLOCK=block)
    return out


__all__ = ["available", "interpreted", "blocks", "DEFAULT_BLOCKS", "draw_seed", "supports", "fused_masked_weight",
           "gumbel_noise_from_seed"]
