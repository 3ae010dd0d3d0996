"""Tile grids, hybrid masks and exact sparsity accounting.

A weight ``W[out, in]`` is cut into a grid of ``tile_rows x tile_cols`` tiles; edge tiles of a
dimension the tile size does not divide are partial and count by their real number of weights.
Each tile has a *kind*: :data:`SPARSE` (2:4), :data:`DENSE` or :data:`ZERO` (all weights pruned).

Pure tensor math: no model, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..options import TILE_MAPS

SPARSE = 0  # 2:4 tile
DENSE = 1
ZERO = 2
KIND_NAMES = {SPARSE: "2:4", DENSE: "dense", ZERO: "zero"}


@dataclass(frozen=True)
class TileGrid:
    """The tile grid of an ``out x in`` matrix."""

    out_features: int
    in_features: int
    tile_rows: int = 128
    tile_cols: int = 128

    def __post_init__(self) -> None:
        if self.out_features <= 0 or self.in_features <= 0:
            raise ValueError(f"matrix shape must be positive, got {self.out_features}x{self.in_features}")
        if self.tile_rows <= 0 or self.tile_cols <= 0:
            raise ValueError(f"tile size must be positive, got {self.tile_rows}x{self.tile_cols}")
        if self.tile_cols % 4:
            raise ValueError(f"tile columns ({self.tile_cols}) must be a multiple of 4 (2:4 groups)")

    @property
    def n_rows(self) -> int:
        """Number of tile rows (along ``out``)."""
        return math.ceil(self.out_features / self.tile_rows)

    @property
    def n_cols(self) -> int:
        """Number of tile columns (along ``in``)."""
        return math.ceil(self.in_features / self.tile_cols)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def row_sizes(self) -> torch.Tensor:
        r = torch.full((self.n_rows,), self.tile_rows, dtype=torch.int64)
        r[-1] = self.out_features - self.tile_rows * (self.n_rows - 1)
        return r

    def col_sizes(self) -> torch.Tensor:
        c = torch.full((self.n_cols,), self.tile_cols, dtype=torch.int64)
        c[-1] = self.in_features - self.tile_cols * (self.n_cols - 1)
        return c

    def tile_numel(self) -> torch.Tensor:
        """Real number of weights of every tile, ``[n_rows, n_cols]`` int64."""
        return self.row_sizes()[:, None] * self.col_sizes()[None, :]

    def expand(self, per_tile: torch.Tensor) -> torch.Tensor:
        """Broadcast a ``[n_rows, n_cols]`` tensor to the full ``[out, in]`` matrix."""
        if tuple(per_tile.shape) != self.shape:
            raise ValueError(f"per-tile tensor has shape {tuple(per_tile.shape)}, grid is {self.shape}")
        full = per_tile.repeat_interleave(self.tile_rows, 0).repeat_interleave(self.tile_cols, 1)
        return full[: self.out_features, : self.in_features]

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a ``[out, in]`` tensor over every tile -> ``[n_rows, n_cols]`` (partial tiles included)."""
        if tuple(x.shape) != (self.out_features, self.in_features):
            raise ValueError(f"tensor has shape {tuple(x.shape)}, grid is {self.out_features}x{self.in_features}")
        pr = self.n_rows * self.tile_rows - self.out_features
        pc = self.n_cols * self.tile_cols - self.in_features
        if pr or pc:
            x = torch.nn.functional.pad(x, (0, pc, 0, pr))
        x = x.reshape(self.n_rows, self.tile_rows, self.n_cols, self.tile_cols)
        return x.sum(dim=(1, 3))


def hybrid_mask(tile_kinds: torch.Tensor, mask24: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Keep-mask ``[out, in]``: dense tiles keep everything, 2:4 tiles use ``mask24``, zero tiles nothing."""
    kinds = grid.expand(tile_kinds.to(mask24.device))
    return torch.where(kinds == DENSE, True, torch.where(kinds == ZERO, False, mask24.bool()))


def classify_tiles(mask: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Kind of every tile of a keep-mask: ZERO if nothing kept, DENSE if all kept, SPARSE if exactly 2:4.

    Raises ``ValueError`` for a tile that is none of these (e.g. unstructured).
    """
    m = mask.bool()
    kept = grid.reduce_sum(m.to(torch.int64))
    numel = grid.tile_numel()
    kinds = torch.full(grid.shape, SPARSE, dtype=torch.int8)
    kinds[kept == numel] = DENSE
    kinds[kept == 0] = ZERO
    if grid.in_features % 4:
        bad = kinds == SPARSE
    else:
        kept_per_group = m.reshape(grid.out_features, -1, 4).sum(-1)
        ok = (kept_per_group == 2).repeat_interleave(4, dim=1).to(torch.int64)
        bad = (kinds == SPARSE) & (grid.reduce_sum(ok) != numel)
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        raise ValueError(f"tile ({r}, {c}) is neither dense, all-zero, nor exactly 2:4")
    return kinds


def density(mask: torch.Tensor) -> float:
    """Fraction of kept entries."""
    return float(mask.sum()) / mask.numel() if mask.numel() else 1.0


def tile_density(mask: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Fraction kept in every tile (float64, ``[n_rows, n_cols]``)."""
    return grid.reduce_sum(mask.to(torch.float64)) / grid.tile_numel().to(torch.float64)


@dataclass(frozen=True)
class BudgetResult:
    """Outcome of :func:`select_dense_tiles`."""

    dense: list[torch.Tensor]  # per layer, bool [n_rows, n_cols]
    achieved_sparsity: float
    target_sparsity: float
    n_dense: int
    n_tiles: int


def select_dense_tiles(
    scores: Sequence[torch.Tensor],
    grids: Sequence[TileGrid],
    sparsity: float,
    *,
    sparse_allowed: Sequence[bool] | None = None,
    tile_map: str = "free",
) -> BudgetResult:
    """Choose dense tiles globally so the sparsity over all layers is as close to ``sparsity`` as possible.

    Every tile is 2:4 (half of its weights pruned) unless chosen dense. Tiles are taken in order of
    decreasing score (across all layers); the number taken is the one whose measured sparsity
    (counting partial tiles by their real size) is closest to the target. Layers with
    ``sparse_allowed[i] = False`` (e.g. ``in`` not a multiple of 4) are dense in full and count in
    the totals as dense. With ``tile_map='columns'`` the units taken are whole tile-columns (scored by the
    mean of their tiles' scores), so that every tile-column ends dense or 2:4 in all its tile-rows.
    """
    if tile_map not in TILE_MAPS:
        raise ValueError(f"unknown tile map {tile_map!r} ({', '.join(TILE_MAPS)})")
    by_col = tile_map == "columns"
    if not 0.0 <= sparsity <= 0.5:
        raise ValueError(f"hybrid sparsity must lie in [0, 0.5], got {sparsity}")
    if len(scores) != len(grids):
        raise ValueError("one score tensor per grid is needed")
    allowed = list(sparse_allowed) if sparse_allowed is not None else [True] * len(grids)
    total = sum(g.numel for g in grids)
    if total == 0:
        raise ValueError("no weights to prune")
    flat_scores, flat_sizes, owners = [], [], []
    pruned_all_sparse = 0.0
    for i, (s, g) in enumerate(zip(scores, grids)):
        if tuple(s.shape) != g.shape:
            raise ValueError(f"layer {i}: scores {tuple(s.shape)} do not match grid {g.shape}")
        if not allowed[i]:
            continue
        pruned_all_sparse += g.numel / 2
        s, n = s.to(torch.float64), g.tile_numel()
        if by_col:
            s, n = s.mean(0), n.sum(0)
        flat_scores.append(s.reshape(-1))
        flat_sizes.append(n.reshape(-1))
        owners.append(torch.full((n.numel(),), i, dtype=torch.int64))
    dense = [torch.zeros(g.shape, dtype=torch.bool) if allowed[i] else torch.ones(g.shape, dtype=torch.bool)
             for i, g in enumerate(grids)]
    if not flat_scores:
        return BudgetResult(dense, 0.0, sparsity, sum(int(d.sum()) for d in dense), sum(d.numel() for d in dense))
    sc = torch.cat(flat_scores)
    sizes = torch.cat(flat_sizes)
    own = torch.cat(owners)
    order = torch.sort(sc, descending=True, stable=True).indices
    # sparsity after taking the first k tiles dense, k = 0..n
    restored = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sizes[order].double() / 2, 0)])
    sp = (pruned_all_sparse - restored) / total
    k = int(torch.argmin((sp - sparsity).abs()))
    local_index = torch.cat([torch.arange(g.n_cols if by_col else g.n_rows * g.n_cols)
                             for i, g in enumerate(grids) if allowed[i]])
    for t in order[:k].tolist():
        li = int(own[t])
        if by_col:
            dense[li][:, int(local_index[t])] = True
        else:
            dense[li].view(-1)[int(local_index[t])] = True
    return BudgetResult(
        dense=dense,
        achieved_sparsity=float(sp[k]),
        target_sparsity=sparsity,
        n_dense=sum(int(d.sum()) for d in dense),
        n_tiles=sum(d.numel() for d in dense),
    )
