"""Differentiable relaxations of tile and 2:4 masks, and their schedules.

Pure tensor math (no model, no I/O):

- :func:`binary_concrete` relaxes the per-tile dense/2:4 decision: ``sigmoid((k*p + L) / tau)`` with
  logistic noise ``L``; ``P(dense) = sigmoid(k*p)``.
- :func:`gumbel_softmax` relaxes the choice among the six 2:4 candidates of every group of 4.
- :func:`soft_24_mask` turns candidate probabilities into a soft ``[..., in]`` mask.
- :func:`expand_tiles` broadcasts per-tile values to the full weight (partial edge tiles included).
- :class:`LinearSchedule` moves a scale or temperature linearly over the optimiser steps.

``hard=True`` gives the straight-through variant: the forward value is binary / one-hot, the gradient
is the one of the soft relaxation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks.nm import GROUP, N_PATTERNS, PATTERNS
from ..masks.tiles import TileGrid

_EPS = 1e-6


@dataclass(frozen=True)
class LinearSchedule:
    """A value moving linearly from ``start`` (step 0) to ``end`` (last step)."""

    start: float
    end: float

    def at(self, step: int, total_steps: int) -> float:
        """Value at optimiser step ``step`` of ``total_steps`` (0-based; the last step gets ``end``)."""
        if total_steps <= 1:
            return float(self.end)
        frac = min(max(step / (total_steps - 1), 0.0), 1.0)
        return float(self.start + (self.end - self.start) * frac)


def logistic_noise(shape, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard logistic samples ``log(u) - log(1 - u)`` (fp32)."""
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32).clamp_(_EPS, 1 - _EPS)
    return torch.log(u) - torch.log1p(-u)


def gumbel_noise(shape, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log(u))`` (fp32)."""
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32).clamp_(_EPS, 1 - _EPS)
    return u.log_().neg_().log_().neg_()


def binary_concrete(logits: torch.Tensor, scale: float, tau: float, *, noise: torch.Tensor | None = None,
                    hard: bool = False) -> torch.Tensor:
    """Relaxed Bernoulli sample of ``P(1) = sigmoid(scale * logits)`` at temperature ``tau``.

    ``noise`` is standard logistic noise of the logits' shape (``None``: deterministic, the noise-free
    relaxation ``sigmoid(scale * logits / tau)``). With ``hard`` the forward value is ``soft > 0.5``
    and the gradient is the soft one (straight-through).
    """
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    z = scale * logits
    if noise is not None:
        z = z + noise
    soft = torch.sigmoid(z / tau)
    if hard:
        return (soft > 0.5).to(soft.dtype) + soft - soft.detach()
    return soft


def gumbel_softmax(logits: torch.Tensor, scale: float, tau: float, *, noise: torch.Tensor | None = None,
                   hard: bool = False) -> torch.Tensor:
    """Gumbel-softmax over the last axis of ``scale * logits`` at temperature ``tau``.

    ``noise`` is standard Gumbel noise of the logits' shape (``None``: plain softmax). With ``hard``
    the forward value is the one-hot argmax and the gradient the soft one (straight-through).
    """
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    z = scale * logits
    if noise is not None:
        z = z + noise
    soft = torch.softmax(z / tau, dim=-1)
    if hard:
        idx = soft.argmax(dim=-1, keepdim=True)
        one_hot = torch.zeros_like(soft).scatter_(-1, idx, 1.0)
        return one_hot + soft - soft.detach()
    return soft


def soft_24_mask(probs: torch.Tensor) -> torch.Tensor:
    """Soft keep-mask ``[..., groups*4]`` from candidate probabilities ``[..., groups, 6]``.

    Every candidate keeps two of four, so each group's soft mask sums to 2 (density exactly 0.5)
    whatever the probabilities.
    """
    if probs.shape[-1] != N_PATTERNS:
        raise ValueError(f"last axis must hold the {N_PATTERNS} candidates, got {probs.shape[-1]}")
    table = PATTERNS.to(device=probs.device, dtype=probs.dtype)
    m = probs @ table
    return m.reshape(*probs.shape[:-2], probs.shape[-2] * GROUP)


def tile_index(grid: TileGrid, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile row of every output row and tile column of every input column (int64 index vectors)."""
    rows = torch.arange(grid.out_features, device=device) // grid.tile_rows
    cols = torch.arange(grid.in_features, device=device) // grid.tile_cols
    return rows, cols


def expand_tiles(per_tile: torch.Tensor, row_index: torch.Tensor, col_index: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[n_rows, n_cols]`` per-tile values to ``[out, in]`` (differentiable; two gathers)."""
    return per_tile.index_select(0, row_index).index_select(1, col_index)


def mix_masks(tile_full: torch.Tensor, mask24: torch.Tensor) -> torch.Tensor:
    """``M = T + (1 - T) * M24``: a tile value of 1 keeps everything, 0 leaves the 2:4 mask."""
    return tile_full + (1.0 - tile_full) * mask24


def expected_tile_density(tile_dense: torch.Tensor, tile_numel: torch.Tensor) -> torch.Tensor:
    """Kept weights of a layer whose tiles are dense with weight ``tile_dense`` and 2:4 otherwise.

    ``tile_dense`` may be a sampled relaxation or the probability ``sigmoid(k*p)``; the 2:4 part keeps
    half of a tile's weights whatever its soft pattern (see :func:`soft_24_mask`). Returns a scalar.
    """
    return (tile_numel.to(tile_dense.dtype) * (0.5 + 0.5 * tile_dense)).sum()


__all__ = [
    "LinearSchedule", "logistic_noise", "gumbel_noise", "binary_concrete", "gumbel_softmax",
    "soft_24_mask", "tile_index", "expand_tiles", "mix_masks", "expected_tile_density", "fused_soft_24",
    "tile_scaled_weight", "joint_masked_weight",
]


# -- fused versions (same values and gradients as the compositions above, fewer memory passes) ------
def _keepers() -> list[list[int]]:
    """For each of the 4 positions of a group, the candidate ids that keep it (3 each)."""
    return [[c for c in range(N_PATTERNS) if bool(PATTERNS[c, j])] for j in range(GROUP)]


def _positions() -> list[list[int]]:
    """For each candidate, the 2 positions it keeps."""
    return [[j for j in range(GROUP) if bool(PATTERNS[c, j])] for c in range(N_PATTERNS)]


class _Soft24(torch.autograd.Function):
    """Soft 2:4 mask from candidate-major logits ``[6, ..., groups]``; saves only the probabilities.

    Candidate-major layout keeps the softmax over the six candidates a handful of contiguous
    elementwise passes (a softmax over a last axis of size 6 is very slow on CPU).
    """

    @staticmethod
    def forward(ctx, logits, scale, tau, noise, hard):
        with torch.no_grad():
            z = logits * (scale / tau)
            if noise is not None:
                z.add_(noise, alpha=1.0 / tau)
            z.sub_(z.amax(0, keepdim=True)).exp_()
            y = z.div_(z.sum(0, keepdim=True))
            src = y
            if hard:
                src = torch.zeros_like(y).scatter_(0, y.argmax(0, keepdim=True), 1.0)
            pos = [src[a] + src[b] + src[c] for a, b, c in _keepers()]
            m = torch.stack(pos, dim=-1)
        ctx.save_for_backward(y)
        ctx.scale_over_tau = scale / tau
        return m.reshape(*m.shape[:-2], m.shape[-2] * GROUP)

    @staticmethod
    def backward(ctx, grad_m):
        (y,) = ctx.saved_tensors
        gm = grad_m.reshape(*y.shape[1:], GROUP).to(y.dtype)
        g = torch.stack([gm[..., a] + gm[..., b] for a, b in _positions()])  # d loss / d y, [6, ...]
        g.sub_((g * y).sum(0, keepdim=True)).mul_(y).mul_(ctx.scale_over_tau)  # softmax backward
        return g, None, None, None, None


def fused_soft_24(logits_cm: torch.Tensor, scale: float, tau: float, *, noise: torch.Tensor | None = None,
                  hard: bool = False) -> torch.Tensor:
    """Soft 2:4 mask ``[..., in]`` from candidate-major logits ``[6, ..., in/4]`` (Gumbel-softmax;
    straight-through with ``hard``). Equals ``soft_24_mask(gumbel_softmax(logits_cm.movedim(0, -1), ...))``
    in value and gradient, storing only the probabilities for backward."""
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    if logits_cm.shape[0] != N_PATTERNS:
        raise ValueError(f"first axis must hold the {N_PATTERNS} candidates, got {logits_cm.shape[0]}")
    return _Soft24.apply(logits_cm, float(scale), float(tau), noise, bool(hard))


class _TileScaled(torch.autograd.Function):
    """``where(keep24, W, W * T_full)`` with the per-tile gradient reduced by reshaping (no index ops)."""

    @staticmethod
    def forward(ctx, weight, keep24, tiles, grid):
        with torch.no_grad():
            out = torch.where(keep24, weight, weight * _expand_fast(tiles.to(weight.dtype), grid))
        ctx.save_for_backward(weight, keep24)
        ctx.grid = grid
        ctx.tdtype = tiles.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, keep24 = ctx.saved_tensors
        g = torch.where(keep24, 0.0, grad * weight)
        return None, None, _reduce_fast(g.to(ctx.tdtype), ctx.grid), None


def _expand_fast(per_tile: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    nr, nc, tr, tc = grid.n_rows, grid.n_cols, grid.tile_rows, grid.tile_cols
    full = per_tile[:, None, :, None].expand(nr, tr, nc, tc).reshape(nr * tr, nc * tc)
    if nr * tr != grid.out_features or nc * tc != grid.in_features:
        full = full[: grid.out_features, : grid.in_features].contiguous()
    return full


def _reduce_fast(x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    pr = grid.n_rows * grid.tile_rows - grid.out_features
    pc = grid.n_cols * grid.tile_cols - grid.in_features
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.reshape(grid.n_rows, grid.tile_rows, grid.n_cols, grid.tile_cols).sum(dim=(1, 3))


class _JointMixed(torch.autograd.Function):
    """``W * (T_full + (1 - T_full) * M24)`` recomputing ``T_full`` in backward instead of storing it."""

    @staticmethod
    def forward(ctx, weight, m24, tiles, grid):
        with torch.no_grad():
            full = _expand_fast(tiles.to(m24.dtype), grid)
            mask = full.mul_(1.0 - m24).add_(m24)
            out = weight * mask.to(weight.dtype)
        ctx.save_for_backward(weight, m24, tiles)
        ctx.grid = grid
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, m24, tiles = ctx.saved_tensors
        gw = (grad * weight).to(m24.dtype)
        full = _expand_fast(tiles.to(m24.dtype), ctx.grid)
        g_m24 = gw * (1.0 - full) if ctx.needs_input_grad[1] else None
        g_t = _reduce_fast(gw.mul_(1.0 - m24), ctx.grid).to(tiles.dtype) if ctx.needs_input_grad[2] else None
        return None, g_m24, g_t, None


def joint_masked_weight(weight: torch.Tensor, m24: torch.Tensor, tiles: torch.Tensor,
                        grid: TileGrid) -> torch.Tensor:
    """PATCH-Joint masked weight ``W * (T + (1 - T) * M24)`` (``M24`` soft, fp32); gradients to ``M24`` and
    the tile values ``T``. Equals ``weight * mix_masks(expand(T), m24)``."""
    return _JointMixed.apply(weight, m24, tiles, grid)


def tile_scaled_weight(weight: torch.Tensor, keep24: torch.Tensor, tiles: torch.Tensor,
                       grid: TileGrid) -> torch.Tensor:
    """PATCH-Tile masked weight: kept 2:4 weights stay, the others are scaled by their tile's value ``T``.

    Equals ``weight * mix_masks(expand(T), keep24)``; the gradient flows to ``tiles`` only.
    """
    return _TileScaled.apply(weight, keep24, tiles, grid)
