"""The ``tilesparse`` command line: thin entry points over the library API.

Each sub-command lives in :mod:`tilesparse.commands` as a module with ``register(subparsers)``
(which adds its parser and sets ``func``). User mistakes raise :class:`TilesparseError` and are
printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import TilesparseError

COMMANDS = ("fetch", "info", "eval", "zeroshot", "generate", "bench", "prune", "learn", "quantize", "export", "run",
            "import-mask", "export-mask")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilesparse",
        description="Learnable tile-level hybrid (dense / 2:4) sparsity for LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"tilesparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"tilesparse.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except TilesparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
