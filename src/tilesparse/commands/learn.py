"""``tilesparse learn``: learn tile-level hybrid masks (PATCH-Joint, PATCH-Tile) or learned 2:4 (MaskLLM).

Single process: ``tilesparse learn --mode joint --sparsity 0.45 --out runs/joint45``.
Several GPUs: ``torchrun --nproc_per_node 8 -m tilesparse learn --device cuda --dtype bfloat16 ...``
(each rank reads its own data shard; gradients of the logits are averaged across ranks). ``--shard``
splits the weights, the logits and the optimiser state over the ranks (FSDP2; chosen by itself when the
replicated state would not fit in a GPU) and writes a sharded checkpoint, ``OUT/checkpoint.dcp``, that
``--resume`` continues on any number of ranks with the same global batch (``--batch`` x ``--grad-accum``
x ranks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import TilesparseError
from ..learning.config import LearnConfig
from ..options import CALIBRATED_METHODS
from .common import add_model_args, print_json, quiet_libraries
from .config_args import add_config_options, config_values

def register(sub) -> None:
    p = sub.add_parser(
        "learn", help="learn hybrid dense/2:4 tile masks (PATCH) or learned 2:4 masks (MaskLLM)",
        description="Learn masks with frozen weights: tile logits (dense vs 2:4, binary concrete) and, in "
                    "joint/maskllm mode, 2:4 pattern logits (Gumbel-softmax over the six candidates), "
                    "initialised from a one-shot prior. Writes OUT/masks.safetensors (use with "
                    "`tilesparse eval --mask OUT`), OUT/prior/ (the prior's mask), OUT/report.json and, "
                    "while it runs, OUT/checkpoint.pt (resumable; with --shard the folder OUT/checkpoint.dcp, "
                    "resumable on another number of processes; removed at the end unless --keep-checkpoint). "
                    "CPU defaults (seqlen 256, batch 4, 64 steps) take 15-20 minutes on the default "
                    "model; docs/NOTEBOOK.md (Learning masks) gives reference-scale GPU settings.")
    add_model_args(p)
    add_config_options(p, LearnConfig)
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the checkpoint once the run has finished (removed by default: logits and "
                        "optimiser state, about 18 bytes per pruned weight in joint/maskllm mode)")
    p.add_argument("--refit", nargs="?", const="mask", default=None, choices=["mask", "tiles"],
                   help="after learning, refit the kept weights with SparseGPT's update (calibrated on the "
                        "training text). 'mask' (the default) keeps the learned mask and writes "
                        "OUT/updated_weights.safetensors, which eval/export --mask OUT apply; 'tiles' keeps the "
                        "learned tile map, lets SparseGPT choose the 2:4 patterns and writes that mask and its "
                        "weights to OUT/refit")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR (same model and settings)")
    p.add_argument("--out", default=None, help="output directory (required unless --resume)")
    p.add_argument("--eval-text", action="append", default=None,
                   help="after learning, perplexity of the masked model on this text (repeatable; "
                        "10 x 512 windows)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, saved: dict | None = None):
    """A validated :class:`~tilesparse.learning.LearnConfig` from CLI options (over ``saved`` when resuming)."""
    values = LearnConfig.from_dict(saved).model_dump() if saved else {}
    values.update(config_values(args, LearnConfig))
    if getattr(args, "dtype", None) is not None:
        values["dtype"] = args.dtype
    return LearnConfig.parse(values)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..data import check_training_source, training_tokens
    from ..learning import (discard_checkpoint, format_density_report, init_distributed_from_env, learn_masks,
                            load_checkpoint)
    from ..learning.trainer import has_checkpoint
    from ..models import load_model

    if args.resume is None and args.out is None:
        raise TilesparseError("--out DIR is required (or --resume DIR)")
    if args.resume is not None and args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise TilesparseError("--resume continues in its own directory; drop --out or give the same directory")
    out = Path(args.resume or args.out).expanduser()
    saved = load_checkpoint(out)["config"] if args.resume else None
    cfg = config_from_args(args, saved)  # validates before the (slow) model load
    if args.resume is None and has_checkpoint(out):
        raise TilesparseError(f"{out} already holds a learning run; use --resume {out} or another --out")
    if args.resume is None and (out / "summary.json").exists():
        raise TilesparseError(f"{out} already holds a finished learning run; choose another --out")
    check_training_source(cfg.text)
    rank, world = init_distributed_from_env(args.device)
    device = args.device
    if device.startswith("cuda") and world > 1:
        import os

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    from ..quant.state import check_not_quantized

    check_not_quantized(loaded.model, "learn")
    ids = training_tokens(loaded, cfg.text, seed=cfg.seed, progress=not args.no_progress and rank == 0)
    calib = None
    if cfg.prior in CALIBRATED_METHODS and not args.resume:
        from ..pruning import calibration_ids

        calib, _ = calibration_ids(loaded, cfg.text, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
    res = learn_masks(loaded.model, cfg, ids, out_dir=out, resume=bool(args.resume), model_name=loaded.name,
                      calib_ids=calib, progress=not args.no_progress, bos_id=loaded.bos_id)
    if rank != 0:
        return 0
    if not args.keep_checkpoint:
        discard_checkpoint(out)
        res.files.pop("checkpoint", None)
    summary = {
        "mode": cfg.mode, "model": loaded.name, "target_sparsity": res.maskset.meta["target_sparsity"],
        "measured_sparsity": res.maskset.sparsity(), "steps": cfg.steps, "tokens": res.tokens,
        "seconds": round(res.seconds, 1), "processes": res.config.world_size, "sharded": res.sharded,
        "files": res.files,
        "final": res.history[-1] if res.history else None,
    }
    evaluated = res.maskset
    if args.refit:
        from ..io.export import save_updated_weights
        from ..pruning import calibration_ids, refit_weights

        if calib is None:
            calib, _ = calibration_ids(loaded, cfg.text, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
        info = refit_weights(loaded.model, calib, res.maskset, keep=args.refit, progress=not args.no_progress)
        where = out if args.refit == "mask" else out / "refit"
        if args.refit == "tiles":
            from ..io import save_mask_artifact

            summary["files"]["refit_masks"] = str(save_mask_artifact(info["maskset"], where))
        summary["files"]["updated_weights"] = str(save_updated_weights(loaded.model, where))
        summary["refit_seconds"] = round(info["seconds"], 1)
        evaluated = info["maskset"]
    if args.eval_text:
        from ..evaluation import evaluate_text
        from ..io import apply_masks

        apply_masks(loaded.model, evaluated)
        summary["perplexity"] = {}
        for t in args.eval_text:
            r = evaluate_text(loaded, t, seqlen=512, max_windows=10, progress=not args.no_progress)
            summary["perplexity"][t] = r.perplexity
    if args.json:
        print_json(summary)
    else:
        print(format_density_report(res.report))
        print(f"{cfg.mode}: sparsity {summary['measured_sparsity']:.4f} (target {summary['target_sparsity']}), "
              f"{cfg.steps} steps, {res.tokens} tokens, {res.seconds:.0f} s; masks in {res.files.get('masks')}")
        for t, v in summary.get("perplexity", {}).items():
            print(f"perplexity on {t}: {v:.3f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0
