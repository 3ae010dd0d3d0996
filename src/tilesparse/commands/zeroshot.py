"""``tilesparse zeroshot``: zero-shot accuracy of a (masked) model through lm-eval-harness, offline."""

from __future__ import annotations

import argparse

from ..errors import TilesparseError
from .common import add_mask_arg, add_model_args, load_masked_model, print_json, quiet_libraries


def register(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot accuracy through lm-eval-harness (local BIG-bench + cloze tasks)",
                       description="Zero-shot evaluation with lm-eval 0.4.13 on task files built locally "
                                   "(BIG-bench goal/step inference, social_iqa, winowhy, timedial; a last-word "
                                   "cloze over Persuasion). Standard lm-eval tasks (hellaswag, piqa, arc, ...) "
                                   "are used when their data are reachable and reported unavailable otherwise.")
    add_model_args(p)
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names (default: all local tasks and the standard ones)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task (default: the 200 prepared per task)")
    p.add_argument("--batch-size", type=int, default=8)
    add_mask_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..evaluation.zeroshot import LOCAL_TASKS, STANDARD_TASKS, _check_limit, run_zeroshot

    _check_limit(args.limit, "--limit")
    if args.batch_size <= 0:
        raise TilesparseError(f"--batch-size must be positive, got {args.batch_size}")
    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in LOCAL_TASKS and t not in STANDARD_TASKS]
        if not tasks or unknown:  # fail before loading the model
            raise TilesparseError(f"unknown zero-shot task(s) {', '.join(unknown) or repr(args.tasks)}; "
                                  f"choose from {', '.join(LOCAL_TASKS + STANDARD_TASKS)}")
    loaded, _ = load_masked_model(args)
    res = run_zeroshot(loaded, tasks, limit=args.limit, batch_size=args.batch_size, device=args.device)
    if args.json:
        print_json(res.to_dict())
    else:
        print(res)
    return 0
