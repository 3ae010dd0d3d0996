"""Which tiles should stay dense? One-shot hybrid masks whose tile map comes from different scores, free or by
whole tile-columns, all with the same 2:4 method inside the 2:4 tiles.

Why: the library scores a tile by the density, inside it, of the same method's unstructured mask at the target
(:func:`tilesparse.pruning.scores.hybrid_tile_kinds`). SparseGPT selects its unstructured mask per block of 128
input columns, so every 128-column block keeps exactly the same share: a tile's density then only says which
tile-rows kept more inside a block, and the mean down a tile-column is the same number for every column (a column
map scored so is an exact tie, broken by order: the first layers' columns). Wanda's mask is balanced per row, so
its column means do carry the input-channel signal. This measures how much the scorer matters. Two scorers apart
from any unstructured mask (``wanda-cost``, ``obs-cost``, :func:`cost_scores`) score a tile by what making it 2:4
would cost, from the dense model's input statistics.

Rows, one model load: dense; for each target sparsity, scorer (``sparsegpt``, ``wanda``, ``magnitude``: the
density of that method's unstructured mask at the target; ``random``: uniform scores, seeded) and tile map
(``free``, ``columns``): the tile map chosen globally at the target by the library
(:func:`~tilesparse.masks.tiles.select_dense_tiles`), then SparseGPT 2:4 inside its 2:4 tiles (mask only, or with
``--update`` its weight update). Perplexity on the out-of-domain texts first.

    PYTHONPATH=src python3 benchmarks/tile_scores.py --out benchmarks/results/tile_scores_cpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from _args import add_model_and_calibration
from _oneshot_session import OneShotSession
from _table import write_table as write_table_md

from tilesparse.io import apply_masks
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, TileGrid, select_dense_tiles
from tilesparse.pruning import (
    PruneConfig,
    hybrid_tile_kinds,
    prune_model,
)

SCORERS = ("sparsegpt", "wanda", "magnitude", "random", "wanda-cost", "obs-cost")
COSTS = ("wanda-cost", "obs-cost")
MAPS = ("free", "columns")


def input_hessians(model, layers, calib, batch: int = 4) -> dict[str, torch.Tensor]:
    """``{layer name: X^T X}`` (float64, ``[in, in]``) of each layer's inputs over the calibration segments, from
    the dense model (forward hooks; one pass)."""
    hs = {l.name: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for l in layers}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            hs[name] += x.t() @ x
        return fn

    handles = [l.module.register_forward_pre_hook(hook(l.name)) for l in layers]
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch):
                model(calib[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return hs


def cost_scores(scorer: str, weight: torch.Tensor, hessian: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Tile scores from what making each tile 2:4 would cost (a high cost keeps it dense), apart from any 2:4
    method: per weight, Wanda's ``(|w| ||x||)^2`` (``wanda-cost``) or the OBS saliency ``w^2 / [H^-1]_jj``
    (``obs-cost``, H damped by 1 % of its mean diagonal); summed over the weights a 2:4 mask by the same saliency
    drops in the tile; divided by the layer's mean tile cost, so that layers of different scales compare."""
    w = weight.detach().double()
    d = torch.diagonal(hessian)
    if scorer == "wanda-cost":
        sal = w.square() * d[None, :]
    else:
        damp = 0.01 * float(d.mean()) + 1e-12
        hinv = torch.linalg.inv(hessian + damp * torch.eye(len(d), dtype=torch.float64))
        sal = w.square() / torch.diagonal(hinv)[None, :]
    dropped = sal * (~topk_mask(sal)).double()
    cost = grid.reduce_sum(dropped)
    return cost / cost.mean().clamp_min(1e-30)


def tile_map(scorer: str, unstructured, layers, grids, sparsity: float, structure: str, seed: int = 0):
    """``{layer name: int8 kinds}`` at ``sparsity`` from ``scorer`` (``unstructured``: that method's keep-masks)."""
    if scorer == "random" or scorer in COSTS:
        if scorer == "random":
            gen = torch.Generator().manual_seed(seed)
            scores = [torch.rand(g.shape, generator=gen, dtype=torch.float64) for g in grids]
        else:  # (``unstructured``: the input Hessians)
            scores = [cost_scores(scorer, l.weight, unstructured[l.name], g) if l.in_features % 4 == 0
                      else torch.zeros(g.shape, dtype=torch.float64) for l, g in zip(layers, grids)]
        allowed = [l.in_features % 4 == 0 for l in layers]
        dense = select_dense_tiles(scores, grids, sparsity, sparse_allowed=allowed, tile_map=structure).dense
        kinds = [torch.where(d, DENSE, SPARSE).to(torch.int8) for d in dense]
    else:
        masks = [unstructured.layers[l.name].to_bool() if l.in_features % 4 == 0 else None for l in layers]
        kinds, _ = hybrid_tile_kinds(masks, grids, sparsity, tile_map=structure)
    return {l.name: k for l, k in zip(layers, kinds) if l.in_features % 4 == 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_calibration(ap, "mobydick,debian-reference,prideprejudice")
    ap.add_argument("--sparsities", default="0.45")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--maps", default=",".join(MAPS))
    ap.add_argument("--update", action="store_true", help="SparseGPT keeps its weight update (default: mask only)")
    ap.add_argument("--out", default="benchmarks/results/tile_scores_cpu.md")
    ap.add_argument("--cache", default=None, help="rows done so far (default runs/tile_scores/results[_update].json)")
    args = ap.parse_args(argv)
    args.cache = args.cache or f"runs/tile_scores/results{'_update' if args.update else ''}.json"
    args.argv = list(sys.argv[1:] if argv is None else argv)
    run = OneShotSession(args, args.cache, write_table)
    cache, loaded, layers, calib, evaluate = run.cache, run.loaded, run.layers, run.calib, run.evaluate
    grids = [TileGrid(l.out_features, l.in_features, 128, 128) for l in layers]
    run.evaluate_dense()
    for s in (float(v) for v in args.sparsities.split(",")):
        for scorer in (x for x in args.scorers.split(",") if x):
            todo = [m for m in args.maps.split(",") if m and f"{scorer}|{s:g}|{m}" not in cache]
            if not todo:
                continue
            unstructured = None
            if scorer in COSTS:
                unstructured = input_hessians(loaded.model, layers, calib)
            elif scorer != "random":
                unstructured = prune_model(loaded.model, calib, PruneConfig(method=scorer, pattern="unstructured",
                                                                            sparsity=s), progress=False)
            for structure in todo:
                t0 = time.perf_counter()
                kinds = tile_map(scorer, unstructured, layers, grids, s, structure)
                cfg = PruneConfig(method="sparsegpt", pattern="hybrid", sparsity=s, update_weights=args.update)
                ms = prune_model(loaded.model, calib, cfg, progress=True, tile_kinds=kinds)
                if not args.update:
                    apply_masks(loaded.model, ms)
                dense_cols = sum(int((k == DENSE).all(0).sum()) for k in kinds.values())
                cache[f"{scorer}|{s:g}|{structure}"] = {
                    "ppl": evaluate(), "sparsity": ms.sparsity(), "seconds": time.perf_counter() - t0,
                    "dense_tiles": sum(int((k == DENSE).sum()) for k in kinds.values()), "dense_columns": dense_cols}
                run.restore()
                print(scorer, s, structure, cache[f"{scorer}|{s:g}|{structure}"], flush=True)
                run.save()
    run.save()
    return 0


def write_table(args, cache, texts, calib_desc, model_name) -> None:
    head = "\n".join([
        "# One-shot hybrid masks: which scores choose the dense tiles",
        "",
        (f"Model: {model_name}. Calibration: {calib_desc['text']} ({args.calib_text}), {calib_desc['samples']} x "
         f"{calib_desc['seqlen']} tokens, seed 0. Perplexity: first {args.windows} x {args.seqlen}-token windows; "
         "Moby Dick and the Debian Reference are out of domain, Pride and Prejudice is the calibration author's "
         "(in domain). Tiles 128x128, chosen globally at the target from the scorer (the density of its "
         "unstructured mask at the target; `random`: uniform scores), free or by whole tile-columns; then "
         "SparseGPT 2:4 in the 2:4 tiles, " + ("with its weight update." if args.update else "mask only.")
         + " `vs sparsegpt free`: the library's default tile choice for this 2:4 method."),
        "",
        f"Machine: {cache.get('_machine')}.",
        "",
        f"Command: `PYTHONPATH=src python3 benchmarks/tile_scores.py {' '.join(args.argv)}`",
    ])
    rows = [{"row": "dense", **{t: f"{v:.2f}" for t, v in cache.get("dense", {}).get("ppl", {}).items()}}]
    for key, r in cache.items():
        if "|" not in key:
            continue
        scorer, s, structure = key.split("|")
        base = cache.get(f"sparsegpt|{s}|free")
        rel = ""
        if base and key != f"sparsegpt|{s}|free":
            rel = " / ".join(f"{r['ppl'][t] / base['ppl'][t]:.2f}x" for t in texts
                             if t in r["ppl"] and t in base["ppl"])
        rows.append({"row": scorer, "sparsity": s, "tile map": structure, "measured": f"{r['sparsity']:.4f}",
                     **{t: f"{r['ppl'][t]:.2f}" for t in texts if t in r["ppl"]}, "vs sparsegpt free": rel,
                     "dense tiles (whole columns)": f"{r['dense_tiles']} ({r['dense_columns']})",
                     "time (s)": f"{r['seconds']:.0f}"})
    write_table_md(head, ["sparsity", "tile map", "measured", *texts, "vs sparsegpt free",
                          "dense tiles (whole columns)", "time (s)"], rows, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
