"""Options and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import json
import logging


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and info logs (ours stay)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))

