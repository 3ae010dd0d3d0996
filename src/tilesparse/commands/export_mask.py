"""``tilesparse export-mask``: our mask artifact -> another project's mask file (PATCH ``mask.npz``)."""

from __future__ import annotations

import argparse

from .common import quiet_libraries

FORMATS = ("patch",)


def register(sub) -> None:
    p = sub.add_parser(
        "export-mask", help="mask artifact -> PATCH mask.npz",
        description="Write a mask artifact in the layout of the PATCH authors' released masks (bit-packed "
                    "mask.npz, one entry per weight), which their load_patch_mask.py applies to the base model.")
    p.add_argument("--mask", required=True, help="mask artifact (folder or .safetensors)")
    p.add_argument("--format", choices=FORMATS, default="patch", help="output layout (default: patch)")
    p.add_argument("--out", required=True, help="output .npz file (or a folder: OUT/mask.npz)")
    p.add_argument("--model", default=None,
                   help="only for models whose linears store [in, out] (GPT-2 Conv1D): write their "
                        "orientation; checks names and shapes (default: no model, [out, in])")
    p.add_argument("--dtype", default="float32", help="dtype to load --model with (default float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..io import load_mask_artifact
    from ..io.patch_format import write_patch_mask

    ms = load_mask_artifact(args.mask)
    model = None
    if args.model is not None:
        from ..models import load_model

        model = load_model(args.model, dtype=args.dtype).model
    target = write_patch_mask(ms, args.out, model)
    print(f"exported {len(ms)} layers (measured sparsity {ms.sparsity():.4f}) as a {args.format} mask -> {target}")
    return 0
