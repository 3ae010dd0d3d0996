"""Where tilesparse caches downloaded and derived files."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "TILESPARSE_CACHE"


def cache_dir() -> Path:
    """Root cache folder: ``$TILESPARSE_CACHE`` or ``~/.cache/tilesparse`` (created on demand)."""
    root = os.environ.get(ENV_CACHE)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "tilesparse"
    path.mkdir(parents=True, exist_ok=True)
    return path
