"""A masked model as a folder that ships: packed hybrid weights, config and tokenizer, checked on reload.

Used by the recipe's export stage and by ``tilesparse export``. The folder loads with
``tilesparse.models.load_model(folder)`` (or any command's ``--model folder``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import TilesparseError

UPDATED_WEIGHTS = "updated_weights.safetensors"  # beside a mask: weights a one-shot pruner reconstructed


def updated_weights_file(mask_path: str | os.PathLike) -> Path | None:
    """The reconstructed weights stored beside a mask artifact (SparseGPT's update), if any."""
    p = Path(mask_path).expanduser()
    folder = p if p.is_dir() else p.parent
    f = folder / UPDATED_WEIGHTS
    return f if f.is_file() else None


def save_updated_weights(model, mask_dir: str | os.PathLike) -> Path:
    """Store the prunable linears' current weights beside a mask (after a one-shot pruner updated them),
    so that the mask is applied to the weights it was made for (:func:`apply_mask_dir`)."""
    from safetensors.torch import save_file

    from ..models import find_prunable_linears

    path = Path(mask_dir) / UPDATED_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {l.name: l.module.weight.detach().contiguous().cpu() for l in find_prunable_linears(model)}
    save_file(weights, str(path))
    return path


def apply_mask_dir(loaded, mask_path: str | os.PathLike, *, updated_weights: bool = True):
    """Apply a mask artifact to a loaded model in place; returns ``(maskset, used_updated_weights)``.

    When the artifact has reconstructed weights beside it (``updated_weights.safetensors``, written by
    SparseGPT with its weight update, or the dequantized weights of ``tilesparse quantize``) and
    ``updated_weights`` is true, those weights are loaded first: the mask was made for them, and without
    them the model is a different (worse) one. Quantized weights mark the model as quantized.
    """
    from .masks import apply_mask_file

    upd = updated_weights_file(mask_path) if updated_weights else None
    if upd is not None:
        from safetensors.torch import load_file

        model = loaded.model
        with torch.no_grad():
            for name, w in load_file(str(upd)).items():
                try:
                    target = model.get_submodule(name).weight
                except AttributeError:
                    raise TilesparseError(f"{upd} holds weights for {name}, which this model does not have") from None
                if tuple(target.shape) != tuple(w.shape):
                    raise TilesparseError(f"{upd}: {name} has shape {tuple(w.shape)}, the model's is "
                                          f"{tuple(target.shape)}")
                target.copy_(w)
    ms = apply_mask_file(loaded, mask_path, check_fingerprint=upd is None)
    if upd is not None and ms.meta.get("quantization"):  # the weights are a quantizer's (tilesparse quantize)
        from ..quant.state import mark_quantized

        q = ms.meta["quantization"]
        mark_quantized(loaded.model, {k: q[k] for k in ("method", "bits", "group_size", "symmetric") if k in q})
    return ms, upd is not None


def _true_config(model, source_name: str) -> None:
    """Make the config that ships say what the file holds: its dtype and where the model came from."""
    cfg = model.config
    cfg.dtype = torch.bfloat16
    cfg._name_or_path = source_name
    if hasattr(cfg, "_model_name_or_path"):  # a GGUF's own name (e.g. a training-run label) is not the model's
        cfg._model_name_or_path = source_name


def export_packed(loaded, maskset, out_dir: str | os.PathLike, *, tile: tuple[int, int],
                  metadata: dict | None = None, quantization=None) -> dict:
    """Pack ``loaded.model`` (with ``maskset`` applied) into the hybrid format (bf16) under ``out_dir``:
    ``model.packed.safetensors`` + ``config.json`` + tokenizer files. The folder is loaded back and its
    logits compared with the packed model's (:func:`check_export`). The model's linears are replaced
    by ``HybridLinear`` modules in place, so reload the model before using it again.

    ``quantization`` (a 4-bit :class:`~tilesparse.quant.ModelQuantization` of the masked weights, as
    :func:`tilesparse.io.quantized.load_quantized` reads it) packs its layers as 4-bit codes
    (:class:`~tilesparse.kernels.linear_q4.HybridLinearQ4`, format version 2) instead of bf16 values.

    Returns the sizes (``file_bytes``, ``dense_bf16_bytes``, ``file_vs_dense``...) and the reload check's
    ``reload_max_logit_diff``.
    """
    from ..kernels.linear import convert_model
    from .packed import non_persistent_buffers

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TilesparseError(f"{out} exists and is not a directory")
    # rotary frequencies etc. ship as the loaded model holds them (fp32), not cast with the weights
    buffers = {k: t.detach().clone() for k, t in non_persistent_buffers(loaded.model).items()}
    model = loaded.model.to(torch.bfloat16)
    for key, t in buffers.items():  # as HF keeps them in a bf16 model, and as the file ships them
        parent, _, name = key.rpartition(".")
        (model.get_submodule(parent) if parent else model)._buffers[name] = t
    dense_bytes = sum(p.numel() * 2 for p in model.parameters())
    linear_bytes = sum(model.get_submodule(n).weight.numel() * 2 for n in maskset.layers)
    masks = maskset.to_bool()
    if quantization is not None:
        masks = _convert_q4(model, masks, quantization, tile)
    convert_model(model, masks, tile=tile)
    size = save_packed_folder(model, out, loaded.tokenizer, loaded.name, buffers,
                              {"sparsity": f"{maskset.sparsity():.6f}", **(metadata or {})})
    diff = check_export(model, out)
    return {"file_bytes": int(size), "dense_bf16_bytes": int(dense_bytes), "linear_dense_bf16_bytes": int(linear_bytes),
            "file_vs_dense": size / dense_bytes, "reload_max_logit_diff": diff}


def _convert_q4(model, masks: dict, quantization, tile: tuple[int, int]) -> dict:
    """Replace the quantized layers by 4-bit packed ones; returns the masks of the layers left to pack in bf16."""
    from ..kernels.linear_q4 import convert_model_q4
    from ..masks.tiles import TileGrid, classify_tiles

    if quantization.config.bits != 4:
        raise TilesparseError(f"the packed 4-bit format holds 4-bit codes; these weights are "
                              f"{quantization.config.bits}-bit (export them without their codes)")
    layers = {}
    for name, q in quantization.layers.items():
        mask = masks.get(name)
        if mask is None:
            raise TilesparseError(f"quantized layer {name} has no mask in the artifact")
        grid = TileGrid(mask.shape[0], mask.shape[1], *tile)
        layers[name] = (q, classify_tiles(mask, grid), mask)
    convert_model_q4(model, layers, tile)
    return {n: m for n, m in masks.items() if n not in layers}


def save_packed_folder(model, out: Path, tokenizer, source_name: str, buffers: dict[str, torch.Tensor],
                       metadata: dict | None = None) -> int:
    """Write a model converted to ``HybridLinear`` layers as a packed folder that :func:`load_model` reads:
    ``model.packed.safetensors`` (with ``buffers``, the non-persistent buffers to ship, and ``metadata``),
    ``config.json`` saying bf16 and ``source_name``, and the tokenizer files. Returns the packed file's size."""
    from ..kernels.linear import HybridLinear
    from ..kernels.linear_q4 import HybridLinearQ4
    from ..models.loading import PACKED_FILE
    from .packed import format_version, save_packed_model

    out.mkdir(parents=True, exist_ok=True)
    size = save_packed_model(model, out / PACKED_FILE, extra_metadata={"model": source_name, **(metadata or {})},
                             buffers=buffers)
    _true_config(model, source_name)
    model.config.save_pretrained(out)
    _declare_quantization(out / "config.json", format_version(
        m.packed for m in model.modules() if isinstance(m, (HybridLinear, HybridLinearQ4))))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return size


def _declare_quantization(config_file: Path, format_version: int) -> None:
    """Say in ``config.json`` that the weights are packed (``quantization_config``, as quantized checkpoints do),
    so that vLLM picks the ``tilesparse`` method (:mod:`tilesparse.integrations.vllm`) by itself."""
    import json

    from ..integrations.vllm import quantization_config

    cfg = json.loads(config_file.read_text())
    cfg["quantization_config"] = quantization_config(format_version)
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_export(model, export_dir: Path, tokens: int = 32) -> float:
    """Load the exported folder back (as a user would) and compare its logits with ``model``'s on a few
    random tokens; raise :class:`TilesparseError` if they differ beyond bf16 rounding (a broken export
    must not ship silently). Returns the largest absolute logit difference."""
    from ..models import load_model

    back = load_model(str(export_dir), dtype=torch.bfloat16, device=str(next(model.parameters()).device))
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(
        next(model.parameters()).device)
    with torch.no_grad():
        ref = model(ids).logits.float()
        got = back.model(ids).logits.float()
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max())
    if not diff <= 0.02 * max(scale, 1.0):
        raise TilesparseError(f"export check failed: the reloaded model {export_dir} differs from the one exported "
                              f"(max |logit diff| {diff:.3g} at logit scale {scale:.3g})")
    return diff
