"""Pure scoring and mask-selection math for one-shot pruning (no model, no hooks).

All weights are ``[out, in]``; masks are boolean keep-masks (True = weight kept).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..masks.nm import topk_mask
from ..masks.tiles import DENSE, SPARSE, BudgetResult, TileGrid, hybrid_mask, select_dense_tiles, tile_density


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| * ||X_j||_2 from the per-input-feature sum of squares ``sq_norm [in]``."""
    if sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"input norms have shape {tuple(sq_norm.shape)}, expected ({weight.shape[1]},)")
    return weight.detach().float().abs() * sq_norm.double().clamp_min(0).sqrt().float()[None, :]


def select_unstructured(scores: torch.Tensor, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * n)`` lowest scores, per ``row`` or over the whole ``layer``.

    Exact counts, never a threshold (ties at the boundary: ``layer`` prunes the lower index first,
    ``row`` any of the tied entries).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"unstructured sparsity must lie in [0, 1), got {sparsity}")
    if scope == "row":
        k = int(round(sparsity * scores.shape[1]))
        keep = torch.ones_like(scores, dtype=torch.bool)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
            keep.scatter_(1, idx, False)
        return keep
    if scope != "layer":
        raise ValueError(f"unknown scope {scope!r}")
    flat = scores.reshape(-1)
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.sort(flat, stable=True).indices[:k]] = False
    return keep.reshape(scores.shape)


def select_2to4(scores: torch.Tensor) -> torch.Tensor:
    """2:4 keep-mask keeping the two highest scores of every group of 4 along ``in``."""
    return topk_mask(scores)


def select_hybrid(scores: torch.Tensor, kinds: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Hybrid keep-mask: dense tiles keep all, 2:4 tiles keep the top two of four, zero tiles nothing."""
    return hybrid_mask(kinds, topk_mask(scores), grid)


def hybrid_tile_kinds(
    prior_masks: Sequence[torch.Tensor | None],
    grids: Sequence[TileGrid],
    sparsity: float,
    tile_map: str = "free",
) -> tuple[list[torch.Tensor], BudgetResult]:
    """Tile maps of a hybrid mask at ``sparsity`` from unstructured prior keep-masks (one per layer).

    Tile score = density of the prior mask in the tile; the densest tiles are made dense, globally over
    all layers, until the hybrid sparsity is as close to the target as tile granularity allows
    (:func:`~tilesparse.masks.tiles.select_dense_tiles`). A layer whose prior is ``None`` (cannot be
    2:4, e.g. ``in`` not a multiple of 4) stays dense in full. ``tile_map='columns'``: whole tile-columns
    (see :data:`~tilesparse.options.TileMap`).
    """
    scores, allowed = [], []
    for m, g in zip(prior_masks, grids):
        allowed.append(m is not None)
        scores.append(tile_density(m, g) if m is not None else torch.zeros(g.shape, dtype=torch.float64))
    budget = select_dense_tiles(scores, grids, sparsity, sparse_allowed=allowed, tile_map=tile_map)
    kinds = [torch.where(d, DENSE, SPARSE).to(torch.int8) for d in budget.dense]
    return kinds, budget
