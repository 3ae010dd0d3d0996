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



def add_mask_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask", default=None, help="mask artifact (folder or .safetensors) to apply to the model")


def load_masked_model(args: argparse.Namespace):
    """Load ``--model`` (dtype, device) and apply ``--mask`` if given; returns ``(loaded, maskset or None)``."""
    from ..io import apply_mask_file
    from ..models import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    maskset = apply_mask_file(loaded, args.mask) if getattr(args, "mask", None) else None
    return loaded, maskset
