"""Priors: initial logits from one-shot masks (pure functions) and a thin adapter to the one-shot pruners.

- Tile prior: per layer, the tiles densest under an unstructured one-shot mask at the target sparsity
  start dense (``+strength * std``), the others 2:4 (``-strength * std``); how many start dense is the
  number that puts the layer at the target sparsity (exact tile budget, partial tiles by real size).
- 2:4 prior: the logit of every candidate is ``(overlap with the one-shot 2:4 pattern - 1) * std *
  strength`` (overlap 2 = the one-shot pattern itself, 0 = its complement).

Random initialisation ``N(0, std^2)`` is added on top by the caller (:func:`init_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TilesparseError
from ..masks.nm import candidate_overlap, topk_mask
from ..masks.tiles import TileGrid, select_dense_tiles, tile_density
from ..options import PRIORS as PRIOR_METHODS


def init_logits(shape, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random logits ``N(0, std^2)`` in fp32."""
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def tile_prior_logits(keep_unstructured: torch.Tensor, grid: TileGrid, sparsity: float, *,
                      std: float, strength: float, tile_map: str = "free") -> torch.Tensor:
    """Tile prior ``[n_rows, n_cols]``: ``+strength*std`` for tiles that start dense, ``-strength*std`` else.

    ``keep_unstructured`` is the ``[out, in]`` boolean mask of an unstructured one-shot pruner at the
    target ``sparsity``; the densest tiles (``tile_map='columns'``: tile-columns) start dense, as many as the
    layer needs to sit at the target.
    """
    dens = tile_density(keep_unstructured, grid)
    chosen = select_dense_tiles([dens], [grid], sparsity, tile_map=tile_map).dense[0]
    mag = strength * std
    return torch.where(chosen, torch.tensor(mag), torch.tensor(-mag)).to(torch.float32)


def pattern_prior_logits(mask24: torch.Tensor, *, std: float, strength: float) -> torch.Tensor:
    """2:4 prior ``[out, in/4, 6]``: ``(overlap with the one-shot pattern - 1) * std * strength``."""
    return (candidate_overlap(mask24).to(torch.float32) - 1.0) * (std * strength)


def magnitude_unstructured(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured magnitude mask of one layer: keep the ``1 - sparsity`` largest ``|W|``."""
    w = weight.detach().abs().float().reshape(-1)
    n_prune = int(round(sparsity * w.numel()))
    keep = torch.ones_like(w, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(w, n_prune, largest=False).indices] = False
    return keep.reshape(weight.shape)


def magnitude_24(weight: torch.Tensor) -> torch.Tensor:
    """2:4 magnitude mask of one layer: the two largest ``|W|`` of every group of 4."""
    return topk_mask(weight.detach().abs().float())


@dataclass
class OneShotMasks:
    """One-shot masks a prior is built from: per layer name, ``[out, in]`` bool masks (either may be absent)."""

    method: str
    unstructured: dict[str, torch.Tensor]
    two_four: dict[str, torch.Tensor]


def one_shot_masks(model, linears, calib_ids: torch.Tensor | None, *, method: str, sparsity: float,
                   need_unstructured: bool, need_24: bool, progress: bool = True) -> OneShotMasks:
    """Run the one-shot pruner ``method`` for the masks a prior needs (the model's weights stay untouched).

    Uses :func:`tilesparse.pruning.prune_model_multi` (one calibration pass) when it is available; ``magnitude`` also works without
    it (pure per-layer magnitude). ``method='none'`` returns no masks (random initialisation only).
    """
    if method not in PRIOR_METHODS:
        raise TilesparseError(f"unknown prior method {method!r}; choose one of {', '.join(PRIOR_METHODS)}")
    out = OneShotMasks(method, {}, {})
    if method == "none":
        return out
    prune_model_multi = PruneConfig = None
    try:
        from ..pruning import PruneConfig, prune_model_multi  # type: ignore[attr-defined]
    except ImportError:
        if method != "magnitude":
            raise TilesparseError(
                f"the {method} prior needs tilesparse.pruning, which this build lacks; use --prior magnitude"
            ) from None
    if prune_model_multi is None or method == "magnitude":
        for layer in linears:
            w = layer.weight
            if need_unstructured:
                out.unstructured[layer.name] = magnitude_unstructured(w, sparsity)
            if need_24 and layer.in_features % 4 == 0:
                out.two_four[layer.name] = magnitude_24(w)
        return out
    if calib_ids is None:
        raise TilesparseError(f"the {method} prior needs calibration data")
    # one calibration pass; the 2:4 config drives it (block inputs come from the 2:4-pruned blocks)
    jobs = []
    if need_24:
        jobs.append(("2:4", 0.5, out.two_four))
    if need_unstructured and sparsity > 0:
        jobs.append(("unstructured", sparsity, out.unstructured))
    if jobs:
        configs = [PruneConfig(method=method, pattern=pat, sparsity=sp) for pat, sp, _ in jobs]
        masksets = prune_model_multi(model, calib_ids, configs, progress=progress)
        for (pattern, _, dest), maskset in zip(jobs, masksets):
            for lm in maskset:
                if lm.pattern == pattern:  # skip layers that could not take the pattern
                    dest[lm.name] = lm.to_bool()
    if need_unstructured and sparsity == 0:
        for layer in linears:
            out.unstructured[layer.name] = torch.ones(layer.out_features, layer.in_features, dtype=torch.bool)
    return out


def one_shot_prior(model, calib_ids: torch.Tensor | None, *, method: str, mode: str, sparsity: float,
                   progress: bool = True) -> OneShotMasks:
    """The one-shot masks a learning run of ``mode`` starts from (:func:`one_shot_masks` over the
    2:4-capable linears: 2:4 always, unstructured at the target for the tile prior)."""
    from ..models import find_prunable_linears

    linears = [l for l in find_prunable_linears(model) if l.in_features % 4 == 0]
    return one_shot_masks(model, linears, calib_ids, method=method, sparsity=sparsity,
                          need_unstructured=mode != "maskllm", need_24=True, progress=progress)


def prior_maskset(shots: OneShotMasks, linears, mode: str, sparsity: float, tile: tuple[int, int],
                  meta: dict | None = None, tile_map: str = "free"):
    """The binary mask the prior stands for, without the random initialisation: what learning adds is
    measured against it.

    Tiles: the per-layer prior choice (:func:`tile_prior_logits` as scores, ranked globally at the exact
    budget like a learned mask); 2:4: the one-shot pattern. ``mode='maskllm'`` gives the one-shot 2:4 mask
    everywhere. Layers the one-shot pruner gave no 2:4 mask for stay dense. ``meta`` (model name,
    fingerprint...) is added to the method and prior recorded here. ``tile_map``: see
    :data:`~tilesparse.options.TileMap`.
    """
    from ..masks.nm import ids_from_mask
    from .final import LayerFinal, build_final_maskset

    finals = []
    for lin in linears:
        grid = TileGrid(lin.out_features, lin.in_features, *tile)
        mask24 = shots.two_four.get(lin.name)
        if mask24 is None:
            finals.append(LayerFinal(lin.name, grid, None, None))
            continue
        scores = None
        if mode != "maskllm" and lin.name in shots.unstructured:
            scores = tile_prior_logits(shots.unstructured[lin.name].cpu(), grid, sparsity, std=1.0, strength=1.0,
                                       tile_map=tile_map)
        finals.append(LayerFinal(lin.name, grid, ids_from_mask(mask24.cpu()), scores))
    meta = {"method": f"one-shot prior ({shots.method})", "prior": shots.method, **(meta or {})}
    return build_final_maskset(finals, sparsity, all_sparse=mode == "maskllm", meta=meta, tile_map=tile_map)


__all__ = [
    "PRIOR_METHODS", "init_logits", "tile_prior_logits", "pattern_prior_logits", "magnitude_unstructured",
    "magnitude_24", "OneShotMasks", "one_shot_masks", "one_shot_prior", "prior_maskset",
]
