"""Where tilesparse caches downloaded and derived files."""

from __future__ import annotations

from pathlib import Path

from .settings import env_name, setting

ENV_CACHE = env_name("cache")


def cache_dir() -> Path:
    """Root cache folder: ``$TILESPARSE_CACHE`` or ``~/.cache/tilesparse`` (created on demand)."""
    root = setting("cache")
    path = root if root is not None else Path.home() / ".cache" / "tilesparse"
    path.mkdir(parents=True, exist_ok=True)
    return path
