"""The layer-by-layer calibration engine: hooks, one decoder block at a time, bounded memory.

1. Capture the inputs of the first decoder block for every calibration sequence (a pre-hook that stops
   the forward there) and, once per batch shape, the extra arguments each block receives (attention
   masks, rotary embeddings: they may differ per block, e.g. Gemma-3's local/global layers).
2. For every block: run the calibration inputs through it with forward hooks on its prunable linears
   that accumulate Wanda's per-feature sums of squares or SparseGPT's Hessian (float64); choose the
   masks with the pure functions of :mod:`.scores` / :mod:`.sparsegpt`; put the pruned weights in; run
   the inputs through again to get the next block's inputs (overwriting them in place); restore the
   original weights unless SparseGPT's ``update_weights`` is on.

Only one block's activations (``n x seqlen x hidden``) and one block's statistics live at a time.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TilesparseError
from ..masks.maskset import LayerMask, MaskSet
from ..masks.nm import ids_from_mask
from ..masks.tiles import TileGrid
from ..models.discovery import PrunableLinear, find_decoder_blocks, find_prunable_linears
from .config import PruneConfig
from .scores import (
    hybrid_tile_kinds,
    magnitude_scores,
    select_2to4,
    select_hybrid,
    select_unstructured,
    wanda_scores,
)
from .sparsegpt import sparsegpt_prune


class DenseLayerWarning(UserWarning):
    """A layer cannot be 2:4 (``in`` not a multiple of 4) and stays dense."""


class _Stop(Exception):
    pass


# --------------------------------------------------------------------------- capture


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _chunks(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


class _BlockCall:
    """How a block is called: the extra positional args and kwargs (hidden states replaced per call)."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args = args
        self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.hidden_kw = "hidden_states" in kwargs and not args

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_kw:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple]:
    if args:
        return args[0], tuple(args[1:])
    return kwargs["hidden_states"], ()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, batch: int
                         ) -> tuple[list[torch.Tensor], dict[int, list[_BlockCall]]]:
    """Inputs of the first decoder block per calibration chunk, and per chunk size the call of every block."""
    _, blocks = find_decoder_blocks(model)
    device = _model_device(model)
    inputs: list[torch.Tensor] = []
    calls: dict[int, list[_BlockCall]] = {}

    def stop_first(_mod, args, kwargs):
        h, _ = _split_hidden(args, kwargs)
        inputs.append(h.detach().clone())
        raise _Stop

    for sl in _chunks(calib_ids.shape[0], batch):
        ids = calib_ids[sl].to(device)
        size = ids.shape[0]
        if size not in calls:  # one full pass (up to the last block) records every block's arguments
            recorded: list[_BlockCall | None] = [None] * len(blocks)
            handles = []

            def make(i):
                def pre(_mod, args, kwargs):
                    h, rest = _split_hidden(args, kwargs)
                    if i == 0:
                        inputs.append(h.detach().clone())
                    recorded[i] = _BlockCall(rest, kwargs)
                return pre

            def stop_after_last(_mod, _args, _out):
                raise _Stop

            for i, b in enumerate(blocks):
                handles.append(b.register_forward_pre_hook(make(i), with_kwargs=True))
            handles.append(blocks[-1].register_forward_hook(stop_after_last))
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
            if any(r is None for r in recorded):
                raise TilesparseError(f"{type(model).__name__}: not every decoder block ran during calibration")
            calls[size] = recorded  # type: ignore[assignment]
        else:
            handle = blocks[0].register_forward_pre_hook(stop_first, with_kwargs=True)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            finally:
                handle.remove()
    return inputs, calls


# --------------------------------------------------------------------------- statistics


class _Stats:
    """Forward hooks accumulating per-layer input statistics in float64.

    Layers fed the very same input tensor (q/k/v, gate/up) share one matmul.
    """

    def __init__(self, layers: Sequence[PrunableLinear], hessian: bool, sq: bool):
        self.hessian: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._want_h, self._want_sq = hessian, sq
        self._last: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self._handles = [l.module.register_forward_hook(self._hook(l.name)) for l in layers]

    def _hook(self, name: str):
        def hook(_mod, args, _out):
            x = args[0].detach()
            if self._last is not None and self._last[0] is x:
                _, xtx, sq = self._last
            else:
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
                xtx = (x2.T @ x2).to(torch.float64) if self._want_h else None
                sq = x2.double().pow(2).sum(0) if self._want_sq and not self._want_h else None
                self._last = (x, xtx, sq)
            n = x.numel() // x.shape[-1]
            self.tokens[name] = self.tokens.get(name, 0) + n
            if xtx is not None:
                if name in self.hessian:
                    self.hessian[name] += xtx
                else:
                    self.hessian[name] = xtx.clone()
            if sq is not None:
                if name in self.sq:
                    self.sq[name] += sq
                else:
                    self.sq[name] = sq.clone()
        return hook

    def end_batch(self) -> None:
        self._last = None

    def sq_norm(self, name: str) -> torch.Tensor:
        if name in self.sq:
            return self.sq[name]
        return torch.diagonal(self.hessian[name]).clone()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None


# --------------------------------------------------------------------------- one layer


def prune_layer(
    weight: torch.Tensor,
    config: PruneConfig,
    *,
    sq_norm: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Keep-mask of one ``[out, in]`` weight under ``config`` (pure; no hooks, no model).

    Returns ``(keep, updated_weight, info)``; ``updated_weight`` is SparseGPT's reconstruction (already
    zero where pruned) or ``None`` for magnitude / Wanda. ``kinds`` is the tile map for the hybrid pattern.
    A given ``keep`` mask is not chosen again: SparseGPT only reconstructs the kept weights for it.
    """
    if keep is not None and config.method != "sparsegpt":
        raise ValueError(f"{name}: a given mask is refitted by SparseGPT, not {config.method}")
    pattern = config.pattern if keep is None else "fixed"
    if pattern == "hybrid" and kinds is None:
        raise ValueError(f"{name}: the hybrid pattern needs its tile map")
    grid = TileGrid(weight.shape[0], weight.shape[1], *config.tile)
    info: dict = {}
    if config.method == "sparsegpt":
        if hessian is None:
            raise ValueError(f"{name}: SparseGPT needs the layer's Hessian")
        res = sparsegpt_prune(weight, hessian, pattern=pattern, sparsity=config.sparsity, kinds=kinds,
                              mask=None if keep is None else keep.to(weight.device), tile=config.tile,
                              blocksize=config.blocksize, damp=config.damp, name=name)
        info = {"damp": res.damp, "fallback": res.fallback, "error": res.error}
        return res.keep, res.weight, info
    if config.method == "wanda":
        if sq_norm is None:
            raise ValueError(f"{name}: Wanda needs the input feature norms")
        scores = wanda_scores(weight, sq_norm)
    else:
        scores = magnitude_scores(weight)
    if pattern == "unstructured":
        keep = select_unstructured(scores, config.sparsity, config.scope)
    elif pattern == "2:4":
        keep = select_2to4(scores)
    else:
        keep = select_hybrid(scores, kinds, grid)
    return keep, None, info


def _layer_mask(name: str, keep: torch.Tensor, config: PruneConfig, kinds: torch.Tensor | None) -> LayerMask:
    out, inp = keep.shape
    keep = keep.cpu()
    if config.pattern == "unstructured":
        return LayerMask(name, out, inp, "unstructured", config.tile, keep=keep)
    ids = ids_from_mask(_fill_24(keep) if config.pattern == "hybrid" else keep)
    if config.pattern == "2:4":
        return LayerMask(name, out, inp, "2:4", config.tile, ids=ids)
    return LayerMask(name, out, inp, "hybrid", config.tile, kinds=kinds.to(torch.int8).cpu(), ids=ids)


def _fill_24(keep: torch.Tensor) -> torch.Tensor:
    """A 2:4 mask equal to ``keep`` on its 2:4 groups; other groups (dense/zero tiles) get pattern 0."""
    g = keep.reshape(keep.shape[0], -1, 4)
    ok = g.sum(-1, keepdim=True) == 2
    first = torch.tensor([True, True, False, False], device=keep.device).expand_as(g)
    return torch.where(ok, g, first).reshape(keep.shape)


# --------------------------------------------------------------------------- the engine


def _check_calib(calib_ids, configs: Sequence[PruneConfig]) -> torch.Tensor | None:
    if not any(c.needs_calibration for c in configs):
        return None
    if calib_ids is None:
        raise TilesparseError(f"{configs[0].method} needs calibration data")
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.ndim != 2 or calib_ids.dtype not in (
            torch.int64, torch.int32):
        raise TilesparseError("calibration ids must be an integer tensor [n, seqlen]")
    if calib_ids.shape[0] < 1 or calib_ids.shape[1] < 2:
        raise TilesparseError(f"calibration ids of shape {tuple(calib_ids.shape)} are too small "
                              "(need at least one sequence of 2 tokens)")
    return calib_ids.long()


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or type(model).__name__)


@torch.no_grad()
def prune_model_multi(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    configs: Sequence[PruneConfig],
    *,
    progress: bool = True,
    tile_kinds: Sequence[dict[str, torch.Tensor] | None] | None = None,
) -> list[MaskSet]:
    """Several masks from ONE sequential calibration pass (e.g. the unstructured + 2:4 PATCH priors).

    The first config drives the pass: every block's inputs are the outputs of the previous blocks
    pruned with ``configs[0]`` (keeping its updated weights when it asks to); the other configs see
    the same inputs and only produce masks (``update_weights`` is allowed on the first config only).
    With a single config this is exactly :func:`prune_model`.

    A hybrid config without a given tile map first runs its own unstructured pass (same method, same
    target) to score the tiles; pass ``tile_kinds`` (per config, ``{layer name: kinds}``) to reuse a map.
    """
    configs = list(configs)
    if not configs:
        raise TilesparseError("no pruning configuration given")
    if any(c.update_weights for c in configs[1:]):
        raise TilesparseError("only the first configuration may keep updated weights")
    calib = _check_calib(calib_ids, configs)
    layers = find_prunable_linears(model)
    fingerprint = _fingerprint(model)
    t_start = time.perf_counter()
    kinds_per_cfg: list[dict[str, torch.Tensor] | None] = list(tile_kinds) if tile_kinds else [None] * len(configs)
    if len(kinds_per_cfg) != len(configs):
        raise TilesparseError("tile_kinds needs one entry per configuration")
    budgets: list[dict | None] = [None] * len(configs)
    for ci, cfg in enumerate(configs):
        if cfg.pattern == "hybrid" and kinds_per_cfg[ci] is None:
            prior_cfg = type(cfg)(**{**cfg.model_dump(), "pattern": "unstructured", "update_weights": False})
            prior = _run(model, calib, [prior_cfg], layers, progress, desc_suffix=" (tile prior)")[0][0]
            kinds_per_cfg[ci], budgets[ci] = _kinds_from_prior(prior, layers, cfg)
        elif cfg.pattern == "hybrid":
            _check_kinds(kinds_per_cfg[ci], layers, cfg)
    layer_masks, infos = _run(model, calib, configs, layers, progress, kinds_per_cfg=kinds_per_cfg)
    seconds = time.perf_counter() - t_start
    results = []
    for ci, cfg in enumerate(configs):
        ms = MaskSet(layer_masks[ci])
        dense_layers = [n for n, lm in ms.layers.items() if lm.pattern == "dense"]
        meta = {
            "model": _model_name(model),
            "fingerprint": fingerprint,
            "method": cfg.method,
            "pattern": cfg.pattern,
            "tile": list(cfg.tile),
            **({"tile_map": cfg.tile_map} if cfg.pattern == "hybrid" else {}),
            "target_sparsity": cfg.sparsity,
            "measured_sparsity": ms.sparsity(),
            "calibration": ({"samples": int(calib.shape[0]), "seqlen": int(calib.shape[1])}
                            if calib is not None and cfg.needs_calibration else None),
            "update_weights": cfg.update_weights,
            "config": cfg.to_dict(),
            "dense_layers": dense_layers,
            "seconds": seconds,
        }
        if budgets[ci] is not None:
            meta["tile_budget"] = budgets[ci]
        if cfg.method == "sparsegpt":
            inf = infos[ci]
            meta["sparsegpt"] = {
                "extra_damping_layers": [n for n, i in inf.items() if i.get("damp", cfg.damp) != cfg.damp
                                         and not i.get("fallback")],
                "fallback_layers": [n for n, i in inf.items() if i.get("fallback")],
            }
        ms.meta = meta
        results.append(ms)
    return results


def prune_model(model: nn.Module, calib_ids: torch.Tensor | None, config: PruneConfig, *,
                progress: bool = True, tile_kinds: dict[str, torch.Tensor] | None = None) -> MaskSet:
    """One-shot pruning of every prunable linear of ``model``; returns the masks (:class:`MaskSet`).

    ``calib_ids`` is ``LongTensor[n, seqlen]`` (ignored, may be ``None``, for magnitude). Blocks are
    processed sequentially: each block's calibration inputs are the previous pruned blocks' outputs.
    With ``config.update_weights=False`` the model's weights are left exactly as they were; with
    ``True`` (SparseGPT) the model keeps the pruned and updated weights. ``tile_kinds``
    (``{layer name: int8 tile map}``) fixes the hybrid tile map instead of deriving it.
    """
    return prune_model_multi(model, calib_ids, [config], progress=progress,
                             tile_kinds=[tile_kinds] if tile_kinds is not None else None)[0]


@torch.no_grad()
def refit_weights(model: nn.Module, calib_ids: torch.Tensor, maskset: MaskSet, *, keep: str = "mask",
                  damp: float = 0.01, blocksize: int = 128, progress: bool = True) -> dict:
    """Reconstruct the kept weights of ``model`` with SparseGPT's layer-wise update for a learned mask; the
    weights change in place (zero where pruned).

    ``keep="mask"``: the mask stays exactly as it is, only the weights change. ``keep="tiles"``: the
    mask's tile map stays (which tiles are dense, which 2:4) and SparseGPT picks the 2:4 pattern of every
    group inside the 2:4 tiles as it updates the weights, as its own 2:4 pruning does. Blocks run in
    order on ``calib_ids`` as in :func:`prune_model` with ``update_weights``: each block's Hessians come
    from the outputs of the blocks already refitted. Returns the mask now in the model (``"maskset"``),
    per-layer infos (damping, fallback) and the wall time.
    """
    from ..options import REFIT_KEEPS

    if keep not in REFIT_KEEPS:
        raise TilesparseError(f"refit keeps one of {', '.join(REFIT_KEEPS)}, got {keep!r}")
    calib = _check_calib(calib_ids, [PruneConfig(method="sparsegpt")])
    layers = find_prunable_linears(model)
    missing = [l.name for l in layers if l.name not in maskset.layers]
    if missing:
        raise TilesparseError(f"the mask has no layer {missing[0]} of this model ({len(missing)} missing)")
    t0 = time.perf_counter()
    if keep == "tiles":
        tiles = {lm.tile for lm in maskset}
        if len(tiles) != 1 or any(lm.pattern == "unstructured" for lm in maskset):
            raise TilesparseError("refit keep='tiles' needs a tiled mask (hybrid or 2:4) with one tile size")
        kinds = {l.name: maskset.layers[l.name].tile_kinds() for l in layers if l.in_features % 4 == 0}
        cfg = PruneConfig(method="sparsegpt", pattern="hybrid", sparsity=min(max(maskset.sparsity(), 0.0), 0.5),
                          tile=tiles.pop(), update_weights=True, damp=damp, blocksize=blocksize)
        out = prune_model_multi(model, calib, [cfg], progress=progress, tile_kinds=[kinds])[0]
        fallback = out.meta["sparsegpt"]["fallback_layers"]
        per_layer = {n: {"fallback": True} for n in fallback}
        out.meta = {**maskset.meta, "measured_sparsity": out.sparsity(),
                    "refit": "tiles: the given tile map, SparseGPT's 2:4 patterns and weight update"}
    else:
        fixed = {l.name: maskset.layers[l.name].to_bool() for l in layers}
        cfg = PruneConfig(method="sparsegpt", pattern="unstructured", sparsity=min(maskset.sparsity(), 0.99),
                          update_weights=True, damp=damp, blocksize=blocksize)
        _, infos = _run(model, calib, [cfg], layers, progress, desc_suffix=" (refit for the given mask)",
                        fixed=fixed)
        out, per_layer = maskset, infos[0]
        fallback = [n for n, i in per_layer.items() if i.get("fallback")]
    return {"maskset": out, "layers": per_layer, "seconds": time.perf_counter() - t0, "fallback_layers": fallback}


@torch.no_grad()
def update_layers(model: nn.Module, calib_ids: torch.Tensor, update, *, desc: str = "update",
                  tokens_per_batch: int = 4096, progress: bool = True) -> dict[str, dict]:
    """The calibration pass of :func:`refit_weights` with any per-layer weight update (e.g. GPTQ).

    Blocks run in order on ``calib_ids``; for every prunable linear of a block,
    ``update(layer, weight, hessian)`` gets the :class:`~tilesparse.models.PrunableLinear`, its current
    ``[out, in]`` weight and its input Hessian (``sum x x^T``, float64, from the outputs of the blocks already
    updated) and returns ``(new [out, in] weight, info dict)``; the new weights stay in the model. Returns
    ``{layer name: info}``.
    """
    cfg = PruneConfig(method="sparsegpt", pattern="unstructured", sparsity=0.0, update_weights=True,
                      tokens_per_batch=tokens_per_batch)
    calib = _check_calib(calib_ids, [cfg])
    _, infos = _run(model, calib, [cfg], find_prunable_linears(model), progress, update=update, desc=desc)
    return infos[0]


def _fingerprint(model: nn.Module) -> str:
    from ..models import weights_fingerprint

    return weights_fingerprint(model)


def _check_kinds(kinds: dict[str, torch.Tensor], layers: Sequence[PrunableLinear], cfg: PruneConfig) -> None:
    for l in layers:
        if l.in_features % 4:
            continue
        k = kinds.get(l.name)
        shape = TileGrid(l.out_features, l.in_features, *cfg.tile).shape
        if k is None or tuple(k.shape) != shape:
            raise TilesparseError(f"tile map for {l.name} is missing or not of shape {shape}")


def _kinds_from_prior(prior: dict[str, LayerMask], layers: Sequence[PrunableLinear], cfg: PruneConfig
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    grids = [TileGrid(l.out_features, l.in_features, *cfg.tile) for l in layers]
    masks = [prior[l.name].to_bool() if l.in_features % 4 == 0 else None for l in layers]
    kinds, budget = hybrid_tile_kinds(masks, grids, cfg.sparsity, tile_map=cfg.tile_map)
    info = {"n_dense": budget.n_dense, "n_tiles": budget.n_tiles, "achieved_sparsity": budget.achieved_sparsity,
            "prior": f"{cfg.method} unstructured {cfg.sparsity:g}", "scope": "global", "tile_map": cfg.tile_map}
    return {l.name: k for l, k in zip(layers, kinds)}, info


def _run(model, calib, configs, layers, progress, *, kinds_per_cfg=None, desc_suffix="", fixed=None, update=None,
         desc=None):
    """The sequential pass; returns per config ``{name: LayerMask}`` and per-layer infos. ``fixed``
    (``{name: keep mask}``, one SparseGPT config) refits the weights for given masks instead; ``update``
    (one SparseGPT config with ``update_weights``) replaces each layer's weight by
    ``update(layer, weight, hessian)[0]`` and records its ``[1]`` as the layer's info (no masks)."""
    lead = configs[0]
    need_calib = any(c.needs_calibration for c in configs)
    need_h = any(c.method == "sparsegpt" for c in configs)
    need_sq = any(c.method == "wanda" for c in configs)
    kinds_per_cfg = kinds_per_cfg or [None] * len(configs)
    _, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[PrunableLinear]] = {}
    for l in layers:
        by_block.setdefault(l.block_index, []).append(l)
    inputs, calls, chunk_of = [], {}, []
    if need_calib:
        batch = max(1, lead.tokens_per_batch // int(calib.shape[1]))
        inputs, calls = capture_block_inputs(model, calib, batch)
        chunk_of = [calls[h.shape[0]] for h in inputs]
    masks: list[dict[str, LayerMask]] = [dict() for _ in configs]
    infos: list[dict[str, dict]] = [dict() for _ in configs]
    warned: set[str] = set()
    desc = desc or lead.label() + desc_suffix
    bar = tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} blocks [{elapsed}<{remaining}]")
    for bi in bar:
        block = blocks[bi]
        blayers = by_block.get(bi, [])
        stats = None
        if need_calib and blayers:
            stats = _Stats(blayers, need_h, need_sq)
            try:
                for h, call_list in zip(inputs, chunk_of):
                    call_list[bi](block, h)
                    stats.end_batch()
            finally:
                stats.remove()
        originals: dict[str, torch.Tensor] = {}
        new_weights: dict[str, torch.Tensor] = {}
        for l in blayers:
            w = l.weight.detach()
            if update is not None:
                new_weights[l.name], infos[0][l.name] = update(l, w, stats.hessian[l.name])
                continue
            for ci, cfg in enumerate(configs):
                grouped = cfg.pattern in ("2:4", "hybrid") and fixed is None
                if grouped and l.in_features % 4:
                    masks[ci][l.name] = LayerMask(l.name, l.out_features, l.in_features, "dense", cfg.tile)
                    if l.name not in warned:
                        warned.add(l.name)
                        warnings.warn(f"{l.name}: in={l.in_features} is not a multiple of 4; the layer stays dense",
                                      DenseLayerWarning, stacklevel=3)
                    continue
                kinds = kinds_per_cfg[ci][l.name] if cfg.pattern == "hybrid" else None
                keep, updated, info = prune_layer(
                    w, cfg, name=l.name, kinds=kinds, keep=fixed[l.name] if fixed is not None else None,
                    sq_norm=stats.sq_norm(l.name) if stats is not None and cfg.method == "wanda" else None,
                    hessian=stats.hessian.get(l.name) if stats is not None and cfg.method == "sparsegpt" else None,
                )
                masks[ci][l.name] = _layer_mask(l.name, keep, cfg, kinds)
                infos[ci][l.name] = info
                if ci == 0:
                    if cfg.update_weights and updated is not None:
                        new_weights[l.name] = updated
                    else:
                        new_weights[l.name] = w.float() * keep.to(w.device)
        del stats
        if need_calib or lead.update_weights:
            for l in blayers:
                if l.name not in new_weights:
                    continue
                if not lead.update_weights:
                    originals[l.name] = l.weight.detach().clone()
                l.set_weight(new_weights[l.name])
            if need_calib and bi + 1 < len(blocks):
                for j, (h, call_list) in enumerate(zip(inputs, chunk_of)):
                    inputs[j] = call_list[bi](block, h).detach()
            for l in blayers:
                if l.name in originals:
                    l.set_weight(originals[l.name])
        if progress:
            bar.set_postfix_str(f"block {bi}", refresh=False)
    bar.close()
    return masks, infos


def calibration_ids(loaded, source: str = "austen-train", samples: int = 32, seqlen: int = 512,
                    seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Calibration segments ``[samples, seqlen]`` of a text for a loaded model, and their description.
    Evaluation texts are refused (the masks would be fitted to the text they are measured on)."""
    from ..data import calibration_segments
    from ..data.training import load_training
    from ..models import model_context_length

    ids, name = load_training(loaded, source, seed=seed, use="calibrate", progress=False)
    bos = loaded.bos_id
    segs = calibration_segments(ids, samples, seqlen, seed=seed, bos_id=bos,
                                context=model_context_length(loaded.model))
    return segs, {"text": name, "source": source, "samples": samples, "seqlen": seqlen, "seed": seed,
                  "bos": bos is not None}


def prune_text(loaded, config: PruneConfig | Sequence[PruneConfig], calib_source: str = "austen-train",
               samples: int = 32, seqlen: int = 512, seed: int = 0, *, progress: bool = True,
               tile_kinds: dict[str, torch.Tensor] | None = None) -> MaskSet | list[MaskSet]:
    """:func:`prune_model` on a :class:`~tilesparse.models.LoadedModel` with calibration from a text source.

    Tokenises ``calib_source`` and draws ``samples`` random segments of ``seqlen`` tokens (``seed``);
    magnitude pruning skips this. Given a list of configs, runs :func:`prune_model_multi` (one pass)
    and returns a list. ``meta`` records the model's name and source and the calibration set.
    """
    configs = [config] if isinstance(config, PruneConfig) else list(config)
    calib, desc = (None, None)
    if any(c.needs_calibration for c in configs):
        calib, desc = calibration_ids(loaded, calib_source, samples, seqlen, seed)
    if isinstance(config, PruneConfig):
        results = [prune_model(loaded.model, calib, config, progress=progress, tile_kinds=tile_kinds)]
    else:
        results = prune_model_multi(loaded.model, calib, configs, progress=progress)
    for ms, cfg in zip(results, configs):
        ms.meta["model"] = loaded.name
        ms.meta["model_source"] = str(loaded.source)
        ms.meta["calibration"] = desc if cfg.needs_calibration else None
    return results[0] if isinstance(config, PruneConfig) else results
