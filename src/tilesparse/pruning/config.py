"""Typed configuration of a one-shot pruning run."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from ..errors import TilesparseError
from ..options import PruneMethod, PrunePattern
from ..typed_config import UserConfig, check

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


def _tile_value(value) -> tuple[int, int]:
    try:
        return parse_tile(value)
    except TilesparseError as exc:
        raise ValueError(str(exc)) from None


# A tile size: ``128``, ``"64x128"`` or ``(64, 128)``; stored as ``(rows, cols)``.
Tile = Annotated[tuple[int, int], BeforeValidator(_tile_value)]


class PruneConfig(UserConfig):
    """What to prune and how (every field is also a ``tilesparse prune`` option).

    The hybrid pattern chooses its dense tiles from the tile density of an unstructured mask of the same
    method at the target sparsity, globally over all layers; the other tiles are 2:4.
    """

    method: PruneMethod = Field("sparsegpt", description="one-shot pruner: magnitude (|W|), wanda (|W| * ||X||) "
                                "or sparsegpt (OBS, optional weight update)")
    pattern: PrunePattern = Field("2:4", description="unstructured, 2:4 or hybrid (dense and 2:4 tiles)")
    sparsity: float | None = Field(None, description="target sparsity over the pruned linears: [0, 1) "
                                   "unstructured, [0, 0.5] hybrid (required), 0.5 for 2:4 (default 0.5)")
    tile: Tile = Field((128, 128), description="tile size: N or ROWSxCOLS, columns a multiple of 4")
    update_weights: bool = Field(False, description="SparseGPT: keep its reconstructed weights "
                                 "(OUT/updated_weights.safetensors, applied with the mask by eval/export --mask "
                                 "OUT) and save the pruned model to OUT/model")
    damp: float = Field(0.01, gt=0, description="SparseGPT damping (fraction of the mean Hessian diagonal)")
    blocksize: int = Field(128, gt=0, description="SparseGPT lazy-update block (columns, a multiple of 4)")
    unstructured_scope: Literal["row", "layer"] | None = Field(
        None, description="where an unstructured sparsity is enforced: row (every output row, Wanda's "
        "choice) or layer (the whole matrix, magnitude's); default by method. SparseGPT always selects per "
        "block of blocksize columns, adaptively", json_schema_extra={"cli": False})
    tokens_per_batch: int = Field(4096, gt=0, description="calibration tokens pushed through a block at once "
                                  "(memory knob)", json_schema_extra={"cli": False})

    @model_validator(mode="after")
    def _check(self) -> "PruneConfig":
        s = self.sparsity
        if s is None:
            check(self.pattern != "hybrid", "the hybrid pattern needs a target sparsity in [0, 0.5]")
            s = 0.5
        check(s == s, "sparsity is NaN")
        if self.pattern == "2:4":
            check(abs(s - 0.5) <= 1e-12, f"the 2:4 pattern is exactly 50 % sparse; got sparsity {s} "
                  "(use --pattern hybrid for 0-50 %, unstructured for anything else)")
        if self.pattern == "hybrid":
            check(0.0 <= s <= 0.5, f"hybrid sparsity must lie in [0, 0.5], got {s}")
        if self.pattern == "unstructured":
            check(0.0 <= s < 1.0, f"unstructured sparsity must lie in [0, 1), got {s}")
        self.sparsity = float(s)
        check(not self.update_weights or self.method == "sparsegpt",
              f"--update-weights needs method sparsegpt (got {self.method}); magnitude and Wanda only choose a mask")
        check(self.blocksize % 4 == 0, f"SparseGPT block size must be a positive multiple of 4, got {self.blocksize}")
        return self

    @property
    def scope(self) -> str:
        """Effective unstructured scope for magnitude / Wanda."""
        if self.unstructured_scope:
            return self.unstructured_scope
        return "row" if self.method == "wanda" else "layer"

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    def label(self) -> str:
        """Short human-readable name, e.g. ``sparsegpt hybrid 35%``."""
        pct = f"{100 * self.sparsity:g}%"
        return f"{self.method} {self.pattern}" + ("" if self.pattern == "2:4" else f" {pct}")
