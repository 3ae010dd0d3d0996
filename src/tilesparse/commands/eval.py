"""``tilesparse eval``: perplexity of a (masked) model on a text."""

from __future__ import annotations

import argparse

from ..errors import TilesparseError
from .common import add_mask_arg, add_model_args, load_masked_model, print_json, quiet_libraries


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text (pinned protocol)",
                       description="Perplexity: non-overlapping windows from the start of the text, "
                                   "exp(mean NLL) over all predicted tokens.")
    add_model_args(p)
    p.add_argument("--text", default="prideprejudice",
                   help="an embedded text by name (prideprejudice, persuasion, mobydick, debian-reference "
                        "[non-fiction: prose of the Debian Reference manual], emma, mansfieldpark, "
                        "sensesensibility, northangerabbey, austen-train, austen-eval; wikitext2 and c4 when the "
                        "hub is reachable) or the path of a UTF-8 text or JSONL file (default: prideprejudice)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=10, help="number of windows; 0 = all (default 10)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    add_mask_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..data import load_text
    from ..evaluation import evaluate_text

    if args.windows < 0:
        raise TilesparseError(f"--windows must be >= 0, got {args.windows}")
    if args.batch_size <= 0:
        raise TilesparseError(f"--batch-size must be positive, got {args.batch_size}")
    load_text(args.text)  # a wrong name or path fails before the model loads
    loaded, _, note = load_masked_model(args)
    res = evaluate_text(loaded, args.text, seqlen=args.seqlen, max_windows=args.windows or None,
                        batch_size=args.batch_size)
    if args.json:
        print_json({**res.to_dict(), "model_state": note})
    else:
        print(f"{res} [{note}]")
    return 0
