"""``tilesparse info``: prunable layers, shapes, tile grids and parameter counts of a model."""

from __future__ import annotations

import argparse

from ..pruning.config import parse_tile
from .common import add_model_args, print_json, quiet_libraries


def register(sub) -> None:
    p = sub.add_parser("info", help="prunable layers, shapes, tile grid and parameter counts",
                       description="List the linear layers inside the decoder blocks that tilesparse prunes, "
                                   "with their tile grid for a tile size.")
    add_model_args(p)
    p.add_argument("--tile", default="128", help="tile size: 128 or ROWSxCOLS (default 128)")
    p.add_argument("--layers", action="store_true", help="list every layer (default: first block + totals)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def model_summary(model, tile: tuple[int, int]) -> dict:
    """Layer table and totals for :func:`run` (pure: no printing)."""
    from ..masks import TileGrid
    from ..models import find_decoder_blocks, find_prunable_linears

    stack, blocks = find_decoder_blocks(model)
    layers = []
    for lin in find_prunable_linears(model):
        g = TileGrid(lin.out_features, lin.in_features, *tile)
        partial = (lin.out_features % tile[0] != 0) or (lin.in_features % tile[1] != 0)
        layers.append({
            "name": lin.name, "block": lin.block_index, "out": lin.out_features, "in": lin.in_features,
            "tiles": f"{g.n_rows}x{g.n_cols}", "n_tiles": g.n_rows * g.n_cols, "partial_tiles": partial,
            "params": lin.numel, "can_be_2to4": lin.in_features % 4 == 0,
        })
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(l["params"] for l in layers)
    return {
        "architecture": type(model).__name__, "decoder_stack": stack, "blocks": len(blocks),
        "tile": list(tile), "prunable_layers": len(layers), "tiles": sum(l["n_tiles"] for l in layers),
        "params_total": total, "params_prunable": prunable, "prunable_fraction": prunable / total,
        "layers": layers,
    }


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..models import load_model

    tile = parse_tile(args.tile)
    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    s = model_summary(loaded.model, tile)
    if args.json:
        print_json(s)
        return 0
    print(f"model: {loaded.name} ({s['architecture']}), decoder stack '{s['decoder_stack']}' "
          f"with {s['blocks']} blocks")
    shown = s["layers"] if args.layers else [l for l in s["layers"] if l["block"] == 0]
    print(f"{'layer':<44} {'out':>6} {'in':>6} {'tiles':>7} {'params':>10}")
    for l in shown:
        flag = " (partial edge tiles)" if l["partial_tiles"] else ""
        flag += "" if l["can_be_2to4"] else " (stays dense: in % 4 != 0)"
        print(f"{l['name']:<44} {l['out']:>6} {l['in']:>6} {l['tiles']:>7} {l['params']:>10,}{flag}")
    if not args.layers and s["blocks"] > 1:
        print(f"... and {s['blocks'] - 1} more blocks of the same shape (--layers lists all)")
    print(f"tile {tile[0]}x{tile[1]}: {s['prunable_layers']} prunable layers, {s['tiles']:,} tiles")
    print(f"parameters: {s['params_total']:,} total, {s['params_prunable']:,} prunable "
          f"({100 * s['prunable_fraction']:.1f} %)")
    return 0
