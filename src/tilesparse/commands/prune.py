"""``tilesparse prune``: one-shot magnitude / Wanda / SparseGPT masks (unstructured, 2:4, hybrid tiles)."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from ..errors import TilesparseError
from ..pruning.config import PruneConfig
from .common import add_calibration_args, add_model_args, check_calibration_args, print_json, quiet_libraries
from .config_args import add_config_options, config_values


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="one-shot pruning (magnitude, Wanda, SparseGPT) -> mask artifact",
        description="Prune every linear layer inside the decoder blocks in one shot and write a mask-only "
                    "artifact (OUT/masks.safetensors) that applies to the unmodified base model "
                    "(tilesparse eval --mask OUT). Hybrid: dense tiles chosen from the tile density of an "
                    "unstructured mask at the target sparsity (globally), the other tiles 2:4.")
    add_model_args(p)
    add_config_options(p, PruneConfig)
    add_calibration_args(p)
    p.add_argument("--save-model", action="store_true",
                   help="also save the pruned (masked) model as an HF folder in OUT/model")
    p.add_argument("--eval-text", default=None,
                   help="after pruning, report perplexity on this text (10 x --seqlen windows)")
    p.add_argument("--out", required=True, help="output directory (masks.safetensors, summary.json)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..io import apply_masks, save_mask_artifact, save_pruned_model
    from ..models import load_model
    from ..pruning import prune_text

    cfg = PruneConfig(**config_values(args, PruneConfig))
    check_calibration_args(args, cfg.needs_calibration)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise TilesparseError(f"--out {out} exists and is not a directory")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ms = prune_text(loaded, cfg, calib_source=args.calib_text, samples=args.calib_samples,
                        seqlen=args.seqlen, seed=args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    notes = sorted({str(w.message) for w in caught})
    path = save_mask_artifact(ms, out)
    summary = {
        "mask": str(path),
        "model": ms.meta["model"],
        "method": cfg.method,
        "pattern": cfg.pattern,
        "tile": list(cfg.tile),
        "target_sparsity": cfg.sparsity,
        "measured_sparsity": ms.sparsity(),
        "calibration": ms.meta.get("calibration"),
        "dense_layers": ms.meta.get("dense_layers", []),
        "tile_budget": ms.meta.get("tile_budget"),
        "seconds": round(seconds, 2),
        "warnings": notes,
    }
    if args.update_weights:  # eval/export --mask OUT apply them with the mask
        from ..io.export import save_updated_weights

        summary["updated_weights"] = str(save_updated_weights(loaded.model, out))
    if args.update_weights or args.save_model:
        if not args.update_weights:
            apply_masks(loaded.model, ms)
        summary["model_dir"] = str(save_pruned_model(loaded, out / "model", ms))
    if args.eval_text:
        from ..evaluation import evaluate_text

        if not args.update_weights:
            apply_masks(loaded.model, ms)
        res = evaluate_text(loaded, args.eval_text, seqlen=args.seqlen, max_windows=10,
                            progress=not args.no_progress)
        summary["perplexity"] = res.to_dict()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.json:
        print_json(summary)
    else:
        print(f"{cfg.label()}: measured sparsity {summary['measured_sparsity']:.4f} "
              f"(target {cfg.sparsity:g}) in {seconds:.1f} s -> {path}")
        for n in notes:
            print(f"warning: {n}")
        if summary["dense_layers"]:
            print(f"{len(summary['dense_layers'])} layer(s) stay dense (in not a multiple of 4): "
                  + ", ".join(summary["dense_layers"][:5]))
        if "perplexity" in summary:
            print(f"perplexity {summary['perplexity']['perplexity']:.3f} on {summary['perplexity']['text']}")
    return 0
