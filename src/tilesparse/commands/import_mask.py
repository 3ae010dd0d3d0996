"""``tilesparse import-mask``: a PATCH ``mask.npz`` (the authors' released masks) -> our mask artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TilesparseError
from .common import add_model_args, print_json, quiet_libraries


def register(sub) -> None:
    p = sub.add_parser(
        "import-mask", help="PATCH mask.npz -> mask artifact",
        description="Read a mask released by the PATCH authors (bit-packed mask.npz), check that every layer "
                    "is made of dense and 2:4 tiles, and write our mask artifact (OUT/masks.safetensors). "
                    "The masks are checked against --model (shapes) and record its weight fingerprint.")
    p.add_argument("file", metavar="FILE.npz", help="the PATCH mask file (or a folder holding mask.npz)")
    p.add_argument("--out", required=True, help="output directory (or .safetensors file) of the mask artifact")
    add_model_args(p)
    p.add_argument("--no-model", action="store_true",
                   help="do not load a model: no shape check, no fingerprint (layer names taken from the file)")
    p.add_argument("--tile", default=None,
                   help="tile size: N or ROWSxCOLS (default: the size the file records, else 128)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def import_summary(maskset, source, target) -> dict:
    """Layers, sparsity and tile counts of an imported mask set (pure: no printing)."""
    from ..masks.tiles import DENSE, ZERO

    kinds = [lm.tile_kinds() for lm in maskset if lm.pattern != "unstructured"]
    n_tiles = sum(k.numel() for k in kinds)
    dense = sum(int((k == DENSE).sum()) for k in kinds)
    zero = sum(int((k == ZERO).sum()) for k in kinds)
    tiles = sorted({f"{lm.tile[0]}x{lm.tile[1]}" for lm in maskset})
    return {
        "source": str(source), "mask": str(target), "model": maskset.meta.get("model"),
        "layers": len(maskset), "patterns": sorted({lm.pattern for lm in maskset}), "tile": tiles,
        "measured_sparsity": maskset.sparsity(), "tiles": n_tiles, "dense_tiles": dense, "zero_tiles": zero,
        "dense_tile_fraction": dense / n_tiles if n_tiles else 0.0,
        "unmasked_layers": maskset.meta.get("unmasked_layers", []),
    }


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..io import save_mask_artifact
    from ..io.patch_format import read_patch_mask

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir() and out.suffix != ".safetensors":
        raise TilesparseError(f"--out {out} exists and is not a directory")
    if not Path(args.file).expanduser().exists():  # before the (slow) model load
        raise TilesparseError(f"mask file {args.file} does not exist")
    model = None
    if not args.no_model:
        from ..models import load_model

        model = load_model(args.model, dtype=args.dtype, device=args.device).model
    ms = read_patch_mask(args.file, model, tile=args.tile)
    target = save_mask_artifact(ms, out)
    s = import_summary(ms, args.file, target)
    if args.json:
        print_json(s)
        return 0
    note = f", {s['zero_tiles']} empty" if s["zero_tiles"] else ""
    note += f", {len(s['unmasked_layers'])} layer(s) not in the file kept dense" if s["unmasked_layers"] else ""
    print(f"imported {s['layers']} layers ({'/'.join(s['patterns'])}, tile {'/'.join(s['tile'])}): measured "
          f"sparsity {s['measured_sparsity']:.4f}, dense tiles {100 * s['dense_tile_fraction']:.1f} % "
          f"({s['dense_tiles']} of {s['tiles']}{note}) -> {target}")
    return 0
