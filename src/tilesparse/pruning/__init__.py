"""One-shot pruning: magnitude, Wanda and SparseGPT for unstructured, 2:4 and hybrid-tile patterns.

Pure math lives in :mod:`.scores` (magnitude / Wanda scores, mask selection, hybrid tile maps) and
:mod:`.sparsegpt` (OBS reconstruction of one weight given its Hessian); :mod:`.engine` runs the
layer-by-layer calibration (hooks, one decoder block at a time).
"""

from .config import PruneConfig, Tile, parse_tile
from .engine import (
    DenseLayerWarning,
    calibration_ids,
    capture_block_inputs,
    prune_layer,
    prune_model,
    prune_model_multi,
    prune_text,
    refit_weights,
    update_layers,
)
from .scores import (
    hybrid_tile_kinds,
    magnitude_scores,
    select_2to4,
    select_hybrid,
    select_unstructured,
    wanda_scores,
)
from .sparsegpt import SparseGPTResult, SparseGPTWarning, inverse_hessian_cholesky, sparsegpt_prune

__all__ = [
    "PruneConfig", "Tile", "parse_tile",
    "DenseLayerWarning", "calibration_ids", "capture_block_inputs", "prune_layer", "prune_model",
    "prune_model_multi", "prune_text", "refit_weights", "update_layers",
    "hybrid_tile_kinds", "magnitude_scores", "select_2to4", "select_hybrid", "select_unstructured",
    "wanda_scores",
    "SparseGPTResult", "SparseGPTWarning", "inverse_hessian_cholesky", "sparsegpt_prune",
]
