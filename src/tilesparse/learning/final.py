"""From learned logits to the final binary masks (pure functions, no model).

- 2:4 part: the argmax candidate of every group (PATCH-Joint, MaskLLM) or the fixed prior ids
  (PATCH-Tile).
- Tiles: the tile logits of all layers are ranked together and exactly the number of dense tiles that
  meets the target sparsity is kept dense (:func:`tilesparse.masks.tiles.select_dense_tiles`), instead of
  thresholding the logits at 0 (which misses the target).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..masks.maskset import LayerMask, MaskSet
from ..masks.tiles import DENSE, SPARSE, TileGrid, select_dense_tiles


def final_pattern_ids(pattern_logits: torch.Tensor) -> torch.Tensor:
    """Pattern id (uint8) of the highest-logit candidate of every group: ``[..., groups, 6] -> [..., groups]``."""
    return pattern_logits.argmax(dim=-1).to(torch.uint8)


@dataclass
class LayerFinal:
    """What one layer contributes to the final mask selection."""

    name: str
    grid: TileGrid
    ids: torch.Tensor | None  # uint8 [out, in/4]; None = layer cannot be 2:4 (stays dense)
    tile_scores: torch.Tensor | None  # [n_rows, n_cols] or [1, n_cols]; None = all tiles 2:4 (MaskLLM)


def build_final_maskset(layers: Sequence[LayerFinal], sparsity: float, *, all_sparse: bool = False,
                        meta: dict | None = None, tile_map: str = "free") -> MaskSet:
    """Binary :class:`MaskSet`: ``hybrid`` layers at exactly the global tile budget, or ``2:4`` everywhere.

    With ``all_sparse`` (MaskLLM mode) every 2:4-capable layer is pattern ``2:4``. Otherwise tiles are
    ranked by score across all layers and the budget closest to ``sparsity`` is kept dense. Layers without
    ids are ``dense``. With ``tile_map='columns'`` whole tile-columns are ranked (a layer's scores may then
    be ``[1, n_cols]``). The achieved sparsity is recorded in ``meta['achieved_sparsity']``.
    """
    out: dict[str, LayerMask] = {}
    meta = dict(meta or {})
    if all_sparse:
        for lf in layers:
            g = lf.grid
            if lf.ids is None:
                out[lf.name] = LayerMask(lf.name, g.out_features, g.in_features, "dense", (g.tile_rows, g.tile_cols))
            else:
                out[lf.name] = LayerMask(lf.name, g.out_features, g.in_features, "2:4", (g.tile_rows, g.tile_cols),
                                         ids=lf.ids.to(torch.uint8).cpu())
    else:
        grids = [lf.grid for lf in layers]
        scores = [lf.tile_scores.detach().float().cpu().expand(lf.grid.shape) if lf.tile_scores is not None
                  else torch.zeros(lf.grid.shape) for lf in layers]
        allowed = [lf.ids is not None for lf in layers]
        budget = select_dense_tiles(scores, grids, sparsity, sparse_allowed=allowed, tile_map=tile_map)
        for lf, dense in zip(layers, budget.dense):
            g = lf.grid
            if lf.ids is None:
                out[lf.name] = LayerMask(lf.name, g.out_features, g.in_features, "dense", (g.tile_rows, g.tile_cols))
                continue
            kinds = torch.where(dense, torch.tensor(DENSE, dtype=torch.int8), torch.tensor(SPARSE, dtype=torch.int8))
            out[lf.name] = LayerMask(lf.name, g.out_features, g.in_features, "hybrid", (g.tile_rows, g.tile_cols),
                                     kinds=kinds, ids=lf.ids.to(torch.uint8).cpu())
        meta["dense_tiles"] = budget.n_dense
        meta["tiles"] = budget.n_tiles
        meta["tile_map"] = tile_map
    ms = MaskSet(out, meta)
    ms.meta["target_sparsity"] = sparsity if not all_sparse else 0.5
    ms.meta["achieved_sparsity"] = ms.sparsity()
    return ms


def density_report(maskset: MaskSet, block_of: dict[str, int]) -> dict:
    """Per-layer and per-block density (kept fraction) of a mask set, plus the global one.

    ``block_of`` maps layer names to decoder-block indices. Learned layers are non-uniform; this shows it.
    """
    per_layer = {m.name: 1.0 - m.sparsity for m in maskset}
    kept, total = defaultdict(int), defaultdict(int)
    dense_tiles, tiles = defaultdict(int), defaultdict(int)
    for m in maskset:
        b = block_of.get(m.name, -1)
        kept[b] += m.kept()
        total[b] += m.numel
        if m.pattern in ("hybrid", "2:4", "dense"):
            k = m.tile_kinds()
            dense_tiles[b] += int((k == DENSE).sum())
            tiles[b] += k.numel()
    per_block = {b: kept[b] / total[b] for b in sorted(total)}
    return {
        "density": 1.0 - maskset.sparsity(),
        "sparsity": maskset.sparsity(),
        "per_layer": per_layer,
        "per_block": per_block,
        "dense_tile_fraction_per_block": {b: (dense_tiles[b] / tiles[b] if tiles[b] else 0.0) for b in sorted(total)},
    }


def format_density_report(report: dict, width: int = 40) -> str:
    """A short text rendering: global numbers and one bar per block."""
    lines = [f"sparsity {report['sparsity']:.4f} (density {report['density']:.4f})", "per-block density:"]
    for b, d in report["per_block"].items():
        bar = "#" * int(round(d * width))
        lines.append(f"  block {b:>3}: {d:.3f} {bar}")
    return "\n".join(lines)


__all__ = ["final_pattern_ids", "LayerFinal", "build_final_maskset", "density_report", "format_density_report"]
