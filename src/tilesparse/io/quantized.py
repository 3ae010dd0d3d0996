"""Quantized weights on disk, as a folder that ``eval`` / ``export --mask DIR`` read like a SparseGPT mask.

``tilesparse quantize --out DIR`` (and ``tilesparse.quantize(..., out_dir=DIR)``) write:

- ``masks.safetensors``: the mask the weights were quantized under (an all-dense mask when there was none),
  its ``meta`` gaining ``quantization`` (method, bits, group size, symmetric, base-model fingerprint);
- ``updated_weights.safetensors``: the dequantized weights (:mod:`tilesparse.io.export` loads them before
  applying the mask, as it does for SparseGPT's reconstruction);
- ``quantized.safetensors``: the integer form, per layer ``<layer>.codes`` (uint8 ``[out, in]``, one code
  per byte: not packed), ``<layer>.scales`` and ``<layer>.zeros`` (bfloat16 ``[out, n_groups]``), with
  ``format`` ``tilesparse-quant``, ``format_version`` and a JSON ``header`` (config, layer shapes, meta).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import TilesparseError
from ..masks.maskset import LayerMask, MaskSet

QUANT_FILE = "quantized.safetensors"
FORMAT = "tilesparse-quant"
FORMAT_VERSION = 1


def save_quantized(quantization, path: str | os.PathLike) -> Path:
    """Write a :class:`~tilesparse.quant.ModelQuantization`'s codes, scales and zero points; ``path`` is a
    folder (``QUANT_FILE`` inside it) or a ``.safetensors`` file. Returns the file written."""
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    target = p if p.suffix == ".safetensors" else p / QUANT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors, layers = {}, {}
    for name, q in quantization.layers.items():
        tensors[f"{name}.codes"] = q.codes.contiguous().cpu()
        tensors[f"{name}.scales"] = q.scales.contiguous().cpu()
        tensors[f"{name}.zeros"] = q.zeros.contiguous().cpu()
        layers[name] = {"shape": list(q.codes.shape)}
    header = {"config": quantization.config.to_dict(), "layers": layers, "meta": quantization.meta}
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                               "header": json.dumps(header, default=str)})
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def load_quantized(path: str | os.PathLike):
    """Read what :func:`save_quantized` wrote; returns a :class:`~tilesparse.quant.ModelQuantization`."""
    from safetensors import safe_open

    from ..quant import ModelQuantization, QuantConfig, QuantizedTensor

    p = Path(path).expanduser()
    p = p if p.suffix == ".safetensors" else p / QUANT_FILE
    if not p.is_file():
        raise TilesparseError(f"quantized weights {p} do not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
            raise TilesparseError(f"{p} is not a tilesparse quantized-weights file (version {FORMAT_VERSION})")
        header = json.loads(metadata["header"])
        cfg = QuantConfig(**header["config"])
        layers = {n: QuantizedTensor(tensors[f"{n}.codes"], tensors[f"{n}.scales"], tensors[f"{n}.zeros"],
                                     cfg.bits, cfg.group_size, cfg.symmetric) for n in header["layers"]}
    except TilesparseError:
        raise
    except Exception as exc:
        raise TilesparseError(f"{p} is not a readable quantized-weights file ({type(exc).__name__})") from None
    return ModelQuantization(layers, cfg, header.get("meta", {}))


def dense_maskset(model, meta: dict) -> MaskSet:
    """An all-dense mask for every prunable linear of ``model`` (what a quantized dense model is saved with)."""
    from ..models import find_prunable_linears

    return MaskSet({l.name: LayerMask(l.name, l.out_features, l.in_features, "dense")
                    for l in find_prunable_linears(model)}, dict(meta))


def quantized_maskset(model, quantization, masks: MaskSet | None, model_name: str | None = None) -> MaskSet:
    """The mask to save with quantized weights: ``masks`` (or an all-dense mask) with ``meta.quantization``."""
    record = {**quantization.record(), "base_fingerprint": quantization.meta.get("base_fingerprint"),
              "calibration": quantization.meta.get("calibration")}
    if masks is None:
        meta = {"model": model_name or type(model).__name__, "fingerprint": quantization.meta.get("base_fingerprint"),
                "method": "dense", "pattern": "dense", "target_sparsity": 0.0, "measured_sparsity": 0.0}
        return dense_maskset(model, {**meta, "quantization": record})
    return MaskSet(masks.layers, {**masks.meta, "quantization": record})


def save_quantized_artifact(model, quantization, masks: MaskSet | None, out_dir: str | os.PathLike, *,
                            model_name: str | None = None) -> dict[str, str]:
    """Write the mask, the dequantized weights now in ``model`` and the integer form into ``out_dir``
    (see the module docstring); returns the three paths."""
    from .export import save_updated_weights
    from .masks import save_mask_artifact

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TilesparseError(f"{out} exists and is not a directory")
    ms = quantized_maskset(model, quantization, masks, model_name)
    return {"mask": str(save_mask_artifact(ms, out)), "updated_weights": str(save_updated_weights(model, out)),
            "quantized": str(save_quantized(quantization, out))}

