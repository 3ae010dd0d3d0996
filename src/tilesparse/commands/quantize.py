"""``tilesparse quantize``: weight-only group-wise quantization (RTN or GPTQ) after a mask, as fake-quant."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from ..errors import TilesparseError
from ..quant.config import QuantConfig
from .common import (add_calibration_args, add_model_args, add_updated_weights_arg, check_calibration_args,
                     print_json, quiet_libraries)
from .config_args import add_config_options, config_values


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="4-bit (or 2/3/8-bit) group-wise weight quantization after a mask (RTN or GPTQ)",
        description="Quantize the weights of every linear layer inside the decoder blocks, group-wise along the "
                    "input dimension with bfloat16 scales, after the mask: pruned weights stay exactly 0 and do not "
                    "count in their group's range. GPTQ propagates each column's quantization error to the later "
                    "columns (calibration text). Writes OUT/masks.safetensors, OUT/updated_weights.safetensors (the "
                    "dequantized weights) and OUT/quantized.safetensors (codes, scales, zero points): "
                    "`tilesparse eval --mask OUT` scores the quantized model.")
    add_model_args(p)
    p.add_argument("--mask", default=None,
                   help="mask artifact (folder or .safetensors) to quantize under; its updated weights "
                        "(SparseGPT) are used when present (default: no mask, the dense model)")
    add_updated_weights_arg(p)
    add_config_options(p, QuantConfig)
    p.add_argument("--asymmetric", action="store_true",
                   help="asymmetric grid: each group's [min, max] range with a zero point (default symmetric)")
    add_calibration_args(p, "GPTQ calibration")
    p.add_argument("--save-model", action="store_true",
                   help="also save the quantized model (dequantized weights) as an HF folder in OUT/model")
    p.add_argument("--eval-text", default=None,
                   help="after quantizing, report perplexity on this text (10 x --seqlen windows)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..io.export import apply_mask_dir
    from ..io.quantized import save_quantized_artifact
    from ..models import load_model
    from ..quant import check_not_quantized, quantize_model

    values = config_values(args, QuantConfig)
    if args.asymmetric:
        values["symmetric"] = False
    cfg = QuantConfig(**values)
    check_calibration_args(args, cfg.needs_calibration)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise TilesparseError(f"--out {out} exists and is not a directory")
    if args.mask is not None:
        mask_path = Path(args.mask).expanduser()
        mask_dir = mask_path if mask_path.is_dir() else mask_path.parent
        if out.resolve() == mask_dir.resolve():
            raise TilesparseError("--out must be another folder than the mask's (it would overwrite the mask)")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    check_not_quantized(loaded.model, "quantize")
    masks = None
    if args.mask is not None:
        masks, _ = apply_mask_dir(loaded, args.mask, updated_weights=not args.no_updated_weights)
    calib, calib_desc = None, None
    if cfg.needs_calibration:
        from ..pruning import calibration_ids

        calib, calib_desc = calibration_ids(loaded, args.calib_text, args.calib_samples, args.seqlen, args.seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = quantize_model(loaded.model, cfg, masks, calib, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    if calib_desc is not None:
        res.meta["calibration"] = calib_desc
    notes = sorted({str(w.message) for w in caught})
    files = save_quantized_artifact(loaded.model, res, masks, out, model_name=loaded.name)
    summary = {
        "model": loaded.name,
        "mask": str(args.mask) if args.mask else None,
        "sparsity": masks.sparsity() if masks is not None else 0.0,
        "quantization": cfg.to_dict(),
        "calibration": calib_desc,
        "fallback_layers": res.meta.get("fallback_layers", []),
        "seconds": round(seconds, 2),
        "files": files,
        "warnings": notes,
    }
    if args.save_model:
        from ..io import load_mask_artifact, save_pruned_model

        summary["model_dir"] = str(save_pruned_model(loaded, out / "model", load_mask_artifact(out)))
    if args.eval_text:
        from ..evaluation import evaluate_text

        r = evaluate_text(loaded, args.eval_text, seqlen=args.seqlen, max_windows=10, progress=not args.no_progress)
        summary["perplexity"] = r.to_dict()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.json:
        print_json(summary)
    else:
        what = f"{100 * summary['sparsity']:.1f} % sparse" if masks is not None else "dense"
        print(f"{cfg.label()} ({what}) in {seconds:.1f} s -> {out} (tilesparse eval --mask {out})")
        for n in notes:
            print(f"warning: {n}")
        if "perplexity" in summary:
            print(f"perplexity {summary['perplexity']['perplexity']:.3f} on {summary['perplexity']['text']}")
    return 0
