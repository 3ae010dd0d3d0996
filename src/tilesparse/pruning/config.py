"""Typed configuration of a one-shot pruning run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import TilesparseError
from ..options import PRUNE_METHODS as METHODS
from ..options import PRUNE_PATTERNS


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


@dataclass
class PruneConfig:
    """What to prune and how.

    - ``method``: ``magnitude`` (|W|), ``wanda`` (|W| * ||X||) or ``sparsegpt`` (OBS with weight update).
    - ``pattern``: ``unstructured`` (any sparsity in [0, 1)), ``2:4`` (exactly 50 %) or ``hybrid``
      (target sparsity in [0, 0.5]: dense tiles chosen from the tile density of an unstructured mask
      of the same method at the target, globally over all layers; the other tiles 2:4).
    - ``sparsity``: target sparsity over the pruned linears (``None`` = 0.5 for unstructured and 2:4).
    - ``tile``: ``(rows, cols)`` tile size (an int means square); cols must be a multiple of 4.
    - ``update_weights``: SparseGPT only; keep its reconstructed weights in the model.
    - ``damp``: SparseGPT damping, as a fraction of the mean Hessian diagonal.
    - ``blocksize``: SparseGPT lazy-update block (columns), a multiple of 4.
    - ``unstructured_scope``: where an unstructured sparsity is enforced: ``row`` (every output row,
      Wanda's choice), ``layer`` (the whole matrix, magnitude's) or ``None`` for the method's default.
      SparseGPT always selects per block of ``blocksize`` columns, adaptively (as in its paper).
    - ``tokens_per_batch``: calibration tokens pushed through a block at once (memory knob).
    """

    method: str = "sparsegpt"
    pattern: str = "2:4"
    sparsity: float | None = None
    tile: tuple[int, int] = (128, 128)
    update_weights: bool = False
    damp: float = 0.01
    blocksize: int = 128
    unstructured_scope: str | None = None
    tokens_per_batch: int = 4096
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TilesparseError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.pattern not in PRUNE_PATTERNS:
            raise TilesparseError(f"unknown pattern {self.pattern!r}; choose one of {', '.join(PRUNE_PATTERNS)}")
        self.tile = parse_tile(self.tile)
        s = self.sparsity
        if s is None:
            if self.pattern == "hybrid":
                raise TilesparseError("the hybrid pattern needs a target sparsity in [0, 0.5]")
            s = 0.5
        try:
            s = float(s)
        except (TypeError, ValueError):
            raise TilesparseError(f"sparsity {self.sparsity!r} is not a number") from None
        if s != s:  # NaN
            raise TilesparseError("sparsity is NaN")
        if self.pattern == "2:4" and abs(s - 0.5) > 1e-12:
            raise TilesparseError(f"the 2:4 pattern is exactly 50 % sparse; got sparsity {s} "
                                  "(use --pattern hybrid for 0-50 %, unstructured for anything else)")
        if self.pattern == "hybrid" and not 0.0 <= s <= 0.5:
            raise TilesparseError(f"hybrid sparsity must lie in [0, 0.5], got {s}")
        if self.pattern == "unstructured" and not 0.0 <= s < 1.0:
            raise TilesparseError(f"unstructured sparsity must lie in [0, 1), got {s}")
        self.sparsity = s
        if self.update_weights and self.method != "sparsegpt":
            raise TilesparseError(f"--update-weights needs method sparsegpt (got {self.method}); "
                                  "magnitude and Wanda only choose a mask")
        if not self.damp > 0 or self.damp != self.damp:
            raise TilesparseError(f"damping must be positive, got {self.damp}")
        if self.blocksize <= 0 or self.blocksize % 4:
            raise TilesparseError(f"SparseGPT block size must be a positive multiple of 4, got {self.blocksize}")
        if self.unstructured_scope not in (None, "row", "layer"):
            raise TilesparseError(f"unstructured scope must be row or layer, got {self.unstructured_scope!r}")
        if self.tokens_per_batch <= 0:
            raise TilesparseError(f"tokens per batch must be positive, got {self.tokens_per_batch}")

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = list(self.tile)
        return d
