"""Typed configuration of a one-shot pruning run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..options import PruneMethod, PrunePattern, Tile, TileMap, parse_tile
from ..typed_config import UserConfig, check

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
    tile_map: TileMap = Field("free", description="hybrid tile maps: free (every tile chosen on its own) or "
                              "columns (every tile-column dense or 2:4 in all its tile-rows)")
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


__all__ = ["PruneConfig", "Tile", "parse_tile"]  # Tile and parse_tile live in tilesparse.options
