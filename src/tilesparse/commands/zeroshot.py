"""``tilesparse zeroshot``: zero-shot accuracy of a (masked) model through lm-eval-harness.

The default tasks are generated offline from the embedded evaluation-only texts; BIG-bench tasks come
from a given sdist (``--bigbench`` or ``$TILESPARSE_BIGBENCH_SDIST``) and lm-eval's standard tasks from
the Hugging Face hub, each only when it can be had (otherwise listed as unavailable with the reason).
"""

from __future__ import annotations

import argparse

from ..errors import TilesparseError
from .common import add_mask_arg, add_model_args, load_masked_model, print_json, quiet_libraries


def register(sub) -> None:
    p = sub.add_parser(
        "zeroshot", help="zero-shot accuracy through lm-eval-harness (offline tasks from the embedded texts)",
        description="Zero-shot evaluation with lm-eval 0.4.13. Offline tasks, generated from the embedded "
                    "evaluation-only texts: persuasion_cloze, mobydick_cloze (last-word cloze), "
                    "prideprejudice_next_sentence, mobydick_next_sentence (which of 4 sentences follows) and "
                    "mobydick_word_choice (which of 4 words fills a gap). Optional: lm-eval's standard tasks "
                    "(hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada_openai, boolq, openbookqa) "
                    "when the Hugging Face hub is reachable, and BIG-bench tasks (bb_goal_inference, "
                    "bb_step_inference, bb_social_iqa, bb_winowhy, bb_timedial) from an sdist you give; a task "
                    "that cannot be had is reported unavailable with the reason.")
    add_model_args(p)
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names (default: the offline tasks, BIG-bench when given, and "
                        "the standard ones)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task (default: the 200 prepared per task)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--bigbench", default=None, metavar="PATH",
                   help="a downloaded bigbench-1.0.0.tar.gz or a folder of its task.json files: adds the "
                        "bb_* tasks (default: $TILESPARSE_BIGBENCH_SDIST; never downloaded)")
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
    loaded, _, _ = load_masked_model(args)
    res = run_zeroshot(loaded, tasks, limit=args.limit, batch_size=args.batch_size, device=args.device,
                       bigbench=args.bigbench)
    if args.json:
        print_json(res.to_dict())
    else:
        print(res)
    return 0
