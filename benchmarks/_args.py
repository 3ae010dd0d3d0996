"""Argument types shared by the benchmark scripts."""

from __future__ import annotations

import argparse


def named_path(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> ``(name, path)`` for argparse's ``type=`` (a one-line usage error otherwise)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"takes NAME=PATH, got {spec!r}")
    return name, path


def add_model_and_calibration(ap: argparse.ArgumentParser, eval_texts: str) -> None:
    """The one-shot scripts' shared options: ``--model``, the calibration text and its ``32 x 512`` segments,
    the evaluation texts (default ``eval_texts``) and windows."""
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib-text", default="austen-train")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-texts", default=eval_texts)
    ap.add_argument("--windows", type=int, default=10)
