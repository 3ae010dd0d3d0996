"""Pure mask math: 2:4 patterns (:mod:`.nm`), tile grids and budgets (:mod:`.tiles`)."""

from .nm import (
    GROUP,
    N_PATTERNS,
    PATTERNS,
    NotTwoFourError,
    candidate_overlap,
    check_2to4,
    ids_from_mask,
    is_2to4,
    mask_from_ids,
    pack_ids,
    topk_mask,
    unpack_ids,
)
from .tiles import (
    DENSE,
    SPARSE,
    ZERO,
    BudgetResult,
    TileGrid,
    classify_tiles,
    density,
    hybrid_mask,
    select_dense_tiles,
    tile_density,
)

__all__ = [
    "GROUP", "N_PATTERNS", "PATTERNS", "NotTwoFourError", "candidate_overlap", "check_2to4",
    "ids_from_mask", "is_2to4", "mask_from_ids", "pack_ids", "topk_mask", "unpack_ids",
    "DENSE", "SPARSE", "ZERO", "BudgetResult", "TileGrid", "classify_tiles", "density",
    "hybrid_mask", "select_dense_tiles", "tile_density",
]
