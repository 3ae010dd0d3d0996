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
    return -torch.log(-torch.log(u))


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
    "soft_24_mask", "tile_index", "expand_tiles", "mix_masks", "expected_tile_density",
]
