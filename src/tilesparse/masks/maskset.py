"""In-memory masks of a whole model: one :class:`LayerMask` per prunable linear plus metadata.

A layer mask is one of three *patterns*:

- ``unstructured``: a full boolean keep-mask;
- ``2:4``: every group of 4 along ``in`` keeps two (stored as pattern ids, 3 bits each on disk);
- ``hybrid``: a tile map (dense / 2:4 / zero) plus pattern ids used inside the 2:4 tiles.

Layers that cannot be 2:4 (``in`` not a multiple of 4) are stored as ``dense`` and reported.
Masks use the ``[out, in]`` orientation whatever the module stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..options import PRUNE_PATTERNS
from .nm import mask_from_ids
from .tiles import DENSE, SPARSE, ZERO, TileGrid, hybrid_mask

PATTERNS = (*PRUNE_PATTERNS, "dense")  # what a mask artifact records; "dense" = no pruning


@dataclass
class LayerMask:
    """Keep-mask of one linear layer (see module docstring for the patterns)."""

    name: str
    out_features: int
    in_features: int
    pattern: str
    tile: tuple[int, int] = (128, 128)
    kinds: torch.Tensor | None = None  # int8 [n_rows, n_cols], hybrid only
    ids: torch.Tensor | None = None  # uint8 [out, in/4], 2:4 and hybrid
    keep: torch.Tensor | None = None  # bool [out, in], unstructured only

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown mask pattern {self.pattern!r}")
        shape = (self.out_features, self.in_features)
        if self.pattern == "unstructured" and (self.keep is None or tuple(self.keep.shape) != shape):
            raise ValueError(f"{self.name}: unstructured mask needs keep of shape {shape}")
        if self.pattern in ("2:4", "hybrid") and (
            self.ids is None or tuple(self.ids.shape) != (self.out_features, self.in_features // 4)
            or self.in_features % 4
        ):
            raise ValueError(f"{self.name}: {self.pattern} mask needs ids of shape "
                             f"({self.out_features}, {self.in_features // 4}) and in % 4 == 0")
        if self.pattern == "hybrid" and (self.kinds is None or tuple(self.kinds.shape) != self.grid.shape):
            raise ValueError(f"{self.name}: hybrid mask needs tile kinds of shape {self.grid.shape}")

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.out_features, self.in_features, *self.tile)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def to_bool(self) -> torch.Tensor:
        """The full ``[out, in]`` boolean keep-mask."""
        if self.pattern == "dense":
            return torch.ones(self.out_features, self.in_features, dtype=torch.bool)
        if self.pattern == "unstructured":
            return self.keep.bool()
        m24 = mask_from_ids(self.ids)
        if self.pattern == "2:4":
            return m24
        return hybrid_mask(self.kinds, m24, self.grid)

    def tile_kinds(self) -> torch.Tensor:
        """Tile map for any pattern (2:4 -> all SPARSE, dense -> all DENSE; unstructured has none)."""
        g = self.grid
        if self.pattern == "hybrid":
            return self.kinds
        if self.pattern == "2:4":
            return torch.full(g.shape, SPARSE, dtype=torch.int8)
        if self.pattern == "dense":
            return torch.full(g.shape, DENSE, dtype=torch.int8)
        raise ValueError(f"{self.name}: an unstructured mask has no tile map")

    def kept(self) -> int:
        """Number of kept weights (exact, without materialising when avoidable)."""
        if self.pattern == "dense":
            return self.numel
        if self.pattern == "unstructured":
            return int(self.keep.sum())
        if self.pattern == "2:4":
            return self.numel // 2
        tn = self.grid.tile_numel()
        k = self.kinds
        return int((tn[k == DENSE]).sum() + (tn[k == SPARSE]).sum() // 2)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept() / self.numel


@dataclass
class MaskSet:
    """Masks for every prunable linear of a model, with provenance metadata."""

    layers: dict[str, LayerMask]
    meta: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerMask]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def sparsity(self) -> float:
        """Measured sparsity over all masked linears (numel-weighted)."""
        total = sum(m.numel for m in self)
        return 1.0 - sum(m.kept() for m in self) / total if total else 0.0

    def per_layer(self) -> dict[str, float]:
        return {m.name: m.sparsity for m in self}

    def to_bool(self) -> dict[str, torch.Tensor]:
        """``{layer name: [out, in] bool keep-mask}`` (what the kernels' converter takes)."""
        return {m.name: m.to_bool() for m in self}


__all__ = ["LayerMask", "MaskSet", "PATTERNS", "DENSE", "SPARSE", "ZERO"]
