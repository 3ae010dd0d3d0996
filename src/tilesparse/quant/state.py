"""Whether a model's weights have been quantized: a record on the model's config (kept by ``save_pretrained``)."""

from __future__ import annotations

from torch import nn

from ..errors import TilesparseError

CONFIG_KEY = "tilesparse_quantization"


def _holder(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None else model


def quantization_of(model: nn.Module) -> dict | None:
    """The quantization record of ``model`` (method, bits, group size...), or ``None`` when not quantized."""
    info = getattr(_holder(model), CONFIG_KEY, None)
    return dict(info) if info else None


def mark_quantized(model: nn.Module, info: dict) -> None:
    """Record on ``model`` (its config when it has one) that its weights are quantized."""
    setattr(_holder(model), CONFIG_KEY, dict(info))


def clear_quantized(model: nn.Module) -> None:
    """Forget the quantization record (after the original weights were put back)."""
    holder = _holder(model)
    if hasattr(holder, CONFIG_KEY):
        delattr(holder, CONFIG_KEY)


def describe(info: dict) -> str:
    """A quantization record in words, e.g. ``4-bit GPTQ, group 128, symmetric``."""
    return (f"{info.get('bits')}-bit {str(info.get('method', '?')).upper()}, group {info.get('group_size')}, "
            f"{'symmetric' if info.get('symmetric', True) else 'asymmetric'}")


def check_not_quantized(model: nn.Module, action: str) -> None:
    """Raise a one-line :class:`TilesparseError` when ``model`` is quantized and ``action`` needs the
    unquantized weights."""
    info = quantization_of(model)
    if info is not None:
        raise TilesparseError(f"{action} needs the unquantized model, but this one holds {describe(info)} "
                              "weights; load the base model (quantize last, after the masks)")


__all__ = ["CONFIG_KEY", "quantization_of", "mark_quantized", "clear_quantized", "describe", "check_not_quantized"]
