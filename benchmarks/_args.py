"""Argument types shared by the benchmark scripts."""

from __future__ import annotations

import argparse


def named_path(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> ``(name, path)`` for argparse's ``type=`` (a one-line usage error otherwise)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"takes NAME=PATH, got {spec!r}")
    return name, path
