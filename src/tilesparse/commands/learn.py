"""``tilesparse learn``: learn tile-level hybrid masks (PATCH-Joint, PATCH-Tile) or learned 2:4 (MaskLLM).

Single process: ``tilesparse learn --mode joint --sparsity 0.45 --out runs/joint45``.
Several GPUs: ``torchrun --nproc_per_node 8 -m tilesparse learn --device cuda --dtype bfloat16 ...``
(each rank reads its own data shard; gradients of the logits are averaged across ranks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import TilesparseError
from ..options import CALIBRATED_METHODS, LEARN_MODES, PRIORS
from .common import add_model_args, print_json, quiet_libraries

# option -> LearnConfig field; every option defaults to None = "config default" (or, with --resume,
# "the checkpoint's value") so that only options given explicitly are compared with a checkpoint.
_FIELDS = {
    "mode": "mode", "sparsity": "sparsity", "steps": "steps", "seqlen": "seqlen", "batch": "batch",
    "grad_accum": "grad_accum", "lr": "lr", "tile_lr": "tile_lr", "warmup": "warmup", "prior": "prior",
    "prior_strength": "prior_strength", "calib_samples": "calib_samples", "l1": "l1", "l2": "l2",
    "density_scope": "density_scope", "density_estimate": "density_estimate", "seed": "seed", "text": "text",
    "checkpoint_every": "checkpoint_every", "init_std": "init_std", "max_grad_norm": "max_grad_norm",
}


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.replace("->", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END (e.g. 4,0.05), got {text!r}") from None
    return a, b


def register(sub) -> None:
    p = sub.add_parser(
        "learn", help="learn hybrid dense/2:4 tile masks (PATCH) or learned 2:4 masks (MaskLLM)",
        description="Learn masks with frozen weights: tile logits (dense vs 2:4, binary concrete) and, in "
                    "joint/maskllm mode, 2:4 pattern logits (Gumbel-softmax over the six candidates), "
                    "initialised from a one-shot prior. Writes OUT/masks.safetensors (use with "
                    "`tilesparse eval --mask OUT`), OUT/prior/ (the prior's mask), OUT/report.json and, "
                    "while it runs, OUT/checkpoint.pt (resumable; removed at the end unless --keep-checkpoint). "
                    "CPU defaults (seqlen 256, batch 4, 64 steps) take about 15 minutes on the default "
                    "model; docs/NOTEBOOK.md (Learning masks) gives reference-scale GPU settings.")
    add_model_args(p)
    p.add_argument("--mode", choices=LEARN_MODES, default=None,
                   help="joint = PATCH-Joint (learned tiles + learned 2:4, default), tile = PATCH-Tile "
                        "(learned tiles, fixed one-shot 2:4), maskllm = learned 2:4 everywhere (50 %%)")
    p.add_argument("--sparsity", type=float, default=None, help="target sparsity in [0, 0.5] (default 0.45)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps (default 64: about 15 min on 2 idle CPU cores)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per training sequence (default 256)")
    p.add_argument("--batch", type=int, default=None, help="sequences per micro-batch per process (default 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    p.add_argument("--tile-lr", type=float, default=None, help="learning rate of the tile logits (default --lr)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up: fraction (<1) or steps (default 0.05)")
    p.add_argument("--prior", choices=PRIORS, default=None,
                   help="one-shot method the logits start from (default sparsegpt)")
    p.add_argument("--prior-strength", type=float, default=None, help="prior strength in init stds (default 3)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration segments for the prior (32)")
    p.add_argument("--tile", default=None, help="tile size N or ROWSxCOLS (default 128)")
    p.add_argument("--l1", type=float, default=None, help="density regulariser weight (default by mode)")
    p.add_argument("--l2", type=float, default=None, help="weight-magnitude regulariser weight (default by mode)")
    p.add_argument("--tile-k", type=_pair, default=None, help="tile logit scale schedule START,END")
    p.add_argument("--tile-tau", type=_pair, default=None, help="tile temperature schedule START,END")
    p.add_argument("--pattern-k", type=_pair, default=None, help="2:4 logit scale schedule START,END")
    p.add_argument("--pattern-tau", type=_pair, default=None, help="2:4 temperature schedule START,END")
    p.add_argument("--density-scope", choices=("global", "block"), default=None,
                   help="density regulariser over all layers (default) or per decoder block")
    p.add_argument("--density-estimate", choices=("sampled", "expected"), default=None,
                   help="density of the sampled relaxed mask (default) or its expectation")
    p.add_argument("--hard-tile", action="store_true", default=None, help="straight-through binary tiles")
    p.add_argument("--hard-24", action="store_true", default=None, help="straight-through one-hot 2:4")
    p.add_argument("--init-std", type=float, default=None, help="std of the random logit init (0.014)")
    p.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (0 = off, default)")
    p.add_argument("--seed", type=int, default=None, help="seed (data order, noise, init)")
    p.add_argument("--text", default=None,
                   help="training text (default austen-train; evaluation texts are refused)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute decoder blocks in backward (less memory)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (50; 0 = end only)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUT/checkpoint.pt once the run has finished (removed by default: logits and "
                        "optimiser state, about 18 bytes per pruned weight in joint/maskllm mode)")
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
    """A finalized :class:`~tilesparse.learning.LearnConfig` from CLI options (over ``saved`` when resuming)."""
    from ..learning.config import LearnConfig, finalize

    base = LearnConfig.from_dict(saved) if saved else LearnConfig()
    kw = {}
    for opt, fieldname in _FIELDS.items():
        v = getattr(args, opt, None)
        if v is not None:
            kw[fieldname] = v
    for opt in ("tile_k", "tile_tau", "pattern_k", "pattern_tau"):
        v = getattr(args, opt, None)
        if v is not None:
            kw[opt] = tuple(v)
    for opt in ("hard_tile", "hard_24", "grad_checkpointing"):
        if getattr(args, opt, None):
            kw[opt] = True
    if getattr(args, "tile", None) is not None:
        from ..pruning import parse_tile

        kw["tile"] = parse_tile(args.tile)
    if getattr(args, "dtype", None) is not None:
        kw["dtype"] = args.dtype
    for k, v in kw.items():
        setattr(base, k, v)
    return finalize(base)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..data import check_training_text, load_text, tokenize
    from ..learning import (discard_checkpoint, format_density_report, init_distributed_from_env, learn_masks,
                            load_checkpoint)
    from ..models import load_model

    if args.resume is None and args.out is None:
        raise TilesparseError("--out DIR is required (or --resume DIR)")
    if args.resume is not None and args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise TilesparseError("--resume continues in its own directory; drop --out or give the same directory")
    out = Path(args.resume or args.out).expanduser()
    saved = load_checkpoint(out)["config"] if args.resume else None
    cfg = config_from_args(args, saved)  # validates before the (slow) model load
    if args.resume is None and (out / "checkpoint.pt").exists():
        raise TilesparseError(f"{out} already holds a learning run; use --resume {out} or another --out")
    if args.resume is None and (out / "summary.json").exists():
        raise TilesparseError(f"{out} already holds a finished learning run; choose another --out")
    check_training_text(cfg.text)
    rank, world = init_distributed_from_env(args.device)
    device = args.device
    if device.startswith("cuda") and world > 1:
        import os

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    src = load_text(cfg.text)
    ids = tokenize(loaded.tokenizer, src.text)
    calib = None
    if cfg.prior in CALIBRATED_METHODS and not args.resume:
        from ..pruning import calibration_ids

        calib, _ = calibration_ids(loaded, cfg.text, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
    res = learn_masks(loaded.model, cfg, ids, out_dir=out, resume=bool(args.resume), model_name=loaded.name,
                      calib_ids=calib, progress=not args.no_progress)
    if rank != 0:
        return 0
    if not args.keep_checkpoint:
        discard_checkpoint(out)
        res.files.pop("checkpoint", None)
    summary = {
        "mode": cfg.mode, "model": loaded.name, "target_sparsity": res.maskset.meta["target_sparsity"],
        "measured_sparsity": res.maskset.sparsity(), "steps": cfg.steps, "tokens": res.tokens,
        "seconds": round(res.seconds, 1), "files": res.files,
        "final": res.history[-1] if res.history else None,
    }
    if args.eval_text:
        from ..evaluation import evaluate_text
        from ..io import apply_masks

        apply_masks(loaded.model, res.maskset)
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
