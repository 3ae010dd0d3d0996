"""Options and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import json
import logging


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF model folder, .gguf file, hub id or embedded model name (default: the embedded "
                        "SmolLM2-135M-Instruct; gemma3-270m: the embedded Gemma-3-270M base)")
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
    add_updated_weights_arg(p)


def add_calibration_args(p: argparse.ArgumentParser, what: str = "calibration") -> None:
    """``--calib-text``, ``--calib-samples``, ``--seqlen`` and ``--seed`` (checked by :func:`check_calibration_args`);
    ``what`` names the calibration in the help (e.g. ``"GPTQ calibration"``)."""
    p.add_argument("--calib-text", default="austen-train",
                   help=f"{what} text source (default austen-train: Emma, Mansfield Park, Sense and "
                        "Sensibility, Northanger Abbey)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration segments (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration segment (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration segments")


def check_calibration_args(args: argparse.Namespace, needs_calibration: bool) -> None:
    """One-line errors for :func:`add_calibration_args`' values, before the (slow) model load: a positive
    sample count, and a calibration text that is not an evaluation text."""
    from ..errors import TilesparseError

    if args.calib_samples <= 0:
        raise TilesparseError(f"--calib-samples must be positive, got {args.calib_samples}")
    if needs_calibration:
        from ..data import check_training_source

        check_training_source(args.calib_text, use="calibrate")


def add_updated_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-updated-weights", action="store_true",
                   help="ignore updated_weights.safetensors beside the mask (SparseGPT's reconstructed weights "
                        "or tilesparse quantize's dequantized weights, applied by default when present)")


def load_masked_model(args: argparse.Namespace):
    """Load ``--model`` (dtype, device) and apply ``--mask`` if given (with the updated weights stored
    beside it unless ``--no-updated-weights``); returns ``(loaded, maskset or None, note)``, the note
    saying in words what the model is."""
    from ..io.export import apply_mask_dir
    from ..models import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    from ..kernels.linear import HybridLinear

    packed = sum(isinstance(m, HybridLinear) for m in loaded.model.modules())
    note = f"{packed} packed hybrid layers" if packed else "dense"
    if not getattr(args, "mask", None):
        return loaded, None, note
    if packed:
        from ..errors import TilesparseError

        raise TilesparseError("--mask applies to a dense base model; this packed export already carries its mask")
    ms, updated = apply_mask_dir(loaded, args.mask, updated_weights=not getattr(args, "no_updated_weights", False))
    note = f"masked, {100 * ms.sparsity():.1f} % sparse, " + (
        "with the updated weights stored beside the mask" if updated else "mask only")
    if updated and ms.meta.get("quantization"):
        from ..quant.state import describe

        q = f"{describe(ms.meta['quantization'])} fake-quant"
        note = f"dense, {q}" if all(lm.pattern == "dense" for lm in ms) else f"{note} ({q})"
    return loaded, ms, note
