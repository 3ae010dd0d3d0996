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
                   help="embedded text (prideprejudice, persuasion, emma, mobydick, ...), "
                        "wikitext2/c4, or a path (default: prideprejudice)")
    p.add_argument("--text-file", default=None, help="path to a UTF-8 text file (overrides --text)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=10, help="number of windows; 0 = all (default 10)")
    p.add_argument("--batch-size", type=int, default=4)
    add_mask_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..evaluation import evaluate_text

    if args.windows < 0:
        raise TilesparseError(f"--windows must be >= 0, got {args.windows}")
    source = args.text_file or args.text
    if args.text_file is not None:
        from pathlib import Path

        if not Path(args.text_file).is_file():
            raise TilesparseError(f"text file {args.text_file} does not exist")
    loaded, _ = load_masked_model(args)
    res = evaluate_text(loaded, source, seqlen=args.seqlen, max_windows=args.windows or None,
                        batch_size=args.batch_size)
    if args.json:
        print_json(res.to_dict())
    else:
        print(res)
    return 0
