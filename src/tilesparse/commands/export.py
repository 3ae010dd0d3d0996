"""``tilesparse export``: a mask (from ``prune`` or ``learn``) as a packed model folder that ships."""

from __future__ import annotations

import argparse

from ..errors import TilesparseError
from .common import add_model_args, add_updated_weights_arg, quiet_libraries


def register(sub) -> None:
    p = sub.add_parser("export", help="pack a masked model into a folder that ships (hybrid format, bf16 or 4-bit)",
                       description="Apply a mask artifact to its base model and save the packed hybrid model "
                                   "(model.packed.safetensors + config + tokenizer, bf16; 4-bit codes when the mask folder "
                                   "holds tilesparse quantize's 4-bit output). The folder is loaded "
                                   "back and compared with the packed model before the command succeeds; load "
                                   "it with --model OUT in any command or tilesparse.models.load_model(OUT).")
    add_model_args(p)
    p.add_argument("--mask", required=True, help="mask artifact (folder or .safetensors) from prune or learn")
    p.add_argument("--out", required=True, help="output folder for the packed model")
    p.add_argument("--tile", default=None,
                   help="kernel tile N or ROWSxCOLS (default: the mask's own tile size)")
    add_updated_weights_arg(p)
    p.add_argument("--force", action="store_true", help="write into a folder that already holds a packed model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..io.export import apply_mask_dir, export_packed
    from ..models import load_model
    from ..models.loading import PACKED_FILE

    quiet_libraries()
    out = Path(args.out).expanduser()
    if (out / PACKED_FILE).exists() and not args.force:
        raise TilesparseError(f"{out} already holds a packed model; choose another --out or pass --force")
    if out.exists() and not out.is_dir():
        raise TilesparseError(f"{out} exists and is not a folder")
    if not Path(args.mask).expanduser().exists():
        raise TilesparseError(f"mask artifact {args.mask} does not exist")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    ms, updated = apply_mask_dir(loaded, args.mask, updated_weights=not args.no_updated_weights)
    if args.tile is not None:
        from ..pruning import parse_tile

        tile = parse_tile(args.tile)
    else:
        tile = next(iter(ms)).tile
    quant = _four_bit_codes(args.mask, ms) if updated else None
    info = export_packed(loaded, ms, out, tile=tile, metadata={"mask": str(Path(args.mask).resolve())},
                         quantization=quant)
    weights = "with the updated weights stored beside the mask" if updated else "mask only"
    if quant is not None:
        weights = "4-bit codes, packed"
    print(f"exported {loaded.name}, {100 * ms.sparsity():.1f} % sparse ({weights}), to {out}")
    print(f"  {PACKED_FILE}: {info['file_bytes'] / 2**20:.1f} MiB = {info['file_vs_dense']:.3f}x of the dense bf16 "
          f"model ({info['dense_bf16_bytes'] / 2**20:.1f} MiB)")
    print(f"  reloaded and compared: max |logit diff| {info['reload_max_logit_diff']:.3g} (passed)")
    return 0


def _four_bit_codes(mask: str, ms):
    """The 4-bit codes that ``tilesparse quantize`` saved beside the mask, or ``None`` (no codes, or codes of
    another bit width: those ship as their dequantized values in bf16, as the message says)."""
    from pathlib import Path

    from ..io.quantized import QUANT_FILE, load_quantized

    folder = Path(mask).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    if not ms.meta.get("quantization") or not (folder / QUANT_FILE).is_file():
        return None
    q = load_quantized(folder)
    if q.config.bits != 4:
        print(f"note: {q.config.bits}-bit codes ship as their dequantized values in bf16 (the packed format "
              "holds 4-bit codes)")
        return None
    return q
