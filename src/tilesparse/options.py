"""The values users choose from, defined once as types; the recipe schema, the CLI choices and the Python
configs are built from these.

- :data:`PruneMethod`: one-shot pruners; :data:`CALIBRATED_METHODS` need calibration text.
- :data:`PrunePattern`: what a one-shot pruner produces.
- :data:`LearnMode`: ``joint`` (PATCH-Joint), ``tile`` (PATCH-Tile), ``maskllm`` (learned 2:4 everywhere).
- :data:`Prior`: the one-shot method learning starts from, or ``none`` (random initialisation only).
- :data:`DensityScope`, :data:`DensityEstimate`: how the density regulariser measures density.
- :data:`RecipeKind`: the kinds of method in a recipe.
- :data:`Tile`: a tile size (:func:`parse_tile`: ``128``, ``"64x128"`` or ``(64, 128)``).
- :data:`LearnLoss`: what mask learning minimises: ``ce`` (next-token cross-entropy on the training text),
  ``kd`` (KL divergence from the dense model's next-token distribution), ``kd+ce`` (both).
- :data:`TileMap`: which tile maps a hybrid mask may have: ``free`` (every tile chosen on its own) or
  ``columns`` (a tile-column is dense in every tile-row or 2:4 in every tile-row, so that a layer can run as
  one all-2:4 GEMM plus one dense GEMM over its columns in another order).
- :data:`QuantMethod`: weight quantizers, ``rtn`` (round to nearest) or ``gptq`` (calibrated);
  :data:`QUANT_BITS` the supported bit widths; :data:`QuantObserver`: how a group's range is chosen,
  ``minmax`` (its kept weights' range) or ``mse`` (the shrunk range with the smallest rounding error).

Each type's values are also available as a tuple (``PRUNE_METHODS`` ...).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BeforeValidator

from .errors import TilesparseError
from .typed_config import validator

PruneMethod = Literal["magnitude", "wanda", "sparsegpt"]
PrunePattern = Literal["unstructured", "2:4", "hybrid"]
LearnMode = Literal["joint", "tile", "maskllm"]
Prior = Literal[PruneMethod, "none"]
DensityScope = Literal["global", "block"]
DensityEstimate = Literal["sampled", "expected"]
RecipeKind = Literal["dense", "oneshot", "learn"]
LearnLoss = Literal["ce", "kd", "kd+ce"]
RefitKeep = Literal["mask", "tiles"]  # what a refit keeps of the learned mask
TileMap = Literal["free", "columns"]
QuantMethod = Literal["rtn", "gptq"]
QuantObserver = Literal["minmax", "mse"]

PRUNE_METHODS: tuple[str, ...] = get_args(PruneMethod)
CALIBRATED_METHODS: tuple[str, ...] = ("wanda", "sparsegpt")
PRUNE_PATTERNS: tuple[str, ...] = get_args(PrunePattern)
LEARN_MODES: tuple[str, ...] = get_args(LearnMode)
PRIORS: tuple[str, ...] = get_args(Prior)
DENSITY_SCOPES: tuple[str, ...] = get_args(DensityScope)
DENSITY_ESTIMATES: tuple[str, ...] = get_args(DensityEstimate)
RECIPE_KINDS: tuple[str, ...] = get_args(RecipeKind)
LEARN_LOSSES: tuple[str, ...] = get_args(LearnLoss)
REFIT_KEEPS: tuple[str, ...] = get_args(RefitKeep)
TILE_MAPS: tuple[str, ...] = get_args(TileMap)
QUANT_METHODS: tuple[str, ...] = get_args(QuantMethod)
QUANT_OBSERVERS: tuple[str, ...] = get_args(QuantObserver)
QUANT_BITS: tuple[int, ...] = (2, 3, 4, 8)


def parse_tile(tile) -> tuple[int, int]:
    """``128`` / ``"128"`` / ``"64x128"`` / ``(64, 128)`` -> ``(rows, cols)``; validates it.

    Tile columns must be a multiple of 4 so that a 2:4 group never straddles two tiles.
    """
    if isinstance(tile, str):
        parts = tile.lower().replace("*", "x").split("x")
        try:
            vals = tuple(int(p) for p in parts)
        except ValueError:
            raise TilesparseError(f"tile size {tile!r} is not an integer or ROWSxCOLS") from None
    elif isinstance(tile, int):
        vals = (tile,)
    else:
        try:
            vals = tuple(int(v) for v in tile)
        except TypeError:
            raise TilesparseError(f"tile size {tile!r} is not an integer or a (rows, cols) pair") from None
    if len(vals) == 1:
        vals = (vals[0], vals[0])
    if len(vals) != 2:
        raise TilesparseError(f"tile size {tile!r} must be one integer or ROWSxCOLS")
    rows, cols = vals
    if rows <= 0 or cols <= 0:
        raise TilesparseError(f"tile size must be positive, got {rows}x{cols}")
    if cols % 4:
        raise TilesparseError(f"tile columns ({cols}) must be a multiple of 4 (2:4 groups run along columns)")
    return rows, cols


# A tile size: ``128``, ``"64x128"`` or ``(64, 128)``; stored as ``(rows, cols)``.
Tile = Annotated[tuple[int, int], BeforeValidator(validator(parse_tile))]

__all__ = ["Tile", "parse_tile", "PruneMethod", "PrunePattern", "LearnMode", "Prior", "DensityScope",
           "DensityEstimate", "RecipeKind", "LearnLoss", "PRUNE_METHODS", "CALIBRATED_METHODS", "PRUNE_PATTERNS",
           "LEARN_MODES", "PRIORS", "DENSITY_SCOPES", "DENSITY_ESTIMATES", "RECIPE_KINDS", "LEARN_LOSSES",
           "QuantMethod", "QUANT_METHODS", "QUANT_BITS", "QuantObserver", "QUANT_OBSERVERS", "TileMap", "TILE_MAPS"]
