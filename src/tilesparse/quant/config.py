"""Typed configuration of weight-only quantization."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..options import QUANT_BITS, QuantMethod, QuantObserver
from ..typed_config import ConfigModel, UserConfig, check


class QuantSettings(ConfigModel):
    """The fields of a quantization config, shared by :class:`QuantConfig` and the recipe's ``quantize``
    section (:class:`~tilesparse.recipe.schema.QuantizeConfig`)."""

    method: QuantMethod = Field("gptq", description="rtn (round to nearest) or gptq (calibrated, error "
                                "propagated to later columns with the mask held fixed)")
    bits: int = Field(4, description=f"bits per weight: one of {', '.join(map(str, QUANT_BITS))}")
    group_size: int = Field(128, gt=0, description="weights per scale along the input dimension (the last "
                            "group is shorter when it does not divide the input size)")
    symmetric: bool = Field(True, description="symmetric grid around zero (else min/max range with a zero "
                            "point)", json_schema_extra={"cli": False})
    observer: QuantObserver = Field("minmax", description="how each group's range is chosen: minmax (its "
                                    "weights' range) or mse (the range, shrunk, that rounds the group with the "
                                    "smallest error)")
    act_order: bool = Field(False, description="GPTQ: visit the columns by decreasing Hessian diagonal, each "
                            "group's range fixed beforehand from the unmodified weights (static groups)")
    damp: float = Field(0.01, gt=0, description="GPTQ damping (fraction of the mean Hessian diagonal)")
    blocksize: int = Field(128, gt=0, description="GPTQ lazy-update block (columns)")
    tokens_per_batch: int = Field(4096, gt=0, description="calibration tokens pushed through a block at once "
                                  "(memory knob)", json_schema_extra={"cli": False})

    @model_validator(mode="after")
    def _check(self) -> "QuantSettings":
        check(self.bits in QUANT_BITS, f"bits must be one of {', '.join(map(str, QUANT_BITS))}, got {self.bits}")
        return self


class QuantConfig(UserConfig, QuantSettings):
    """How to quantize the weights of the prunable linears (every field but ``symmetric`` and
    ``tokens_per_batch`` is also a ``tilesparse quantize`` option; ``--asymmetric`` turns ``symmetric`` off)."""

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def label(self) -> str:
        """Short human-readable name, e.g. ``gptq w4 g128 sym`` (``... mse`` with the mse observer, ``... act``
        with GPTQ's act-order)."""
        extra = (" mse" if self.observer == "mse" else "") + (" act" if self.act_order and self.method == "gptq" else "")
        return f"{self.method} w{self.bits} g{self.group_size} {'sym' if self.symmetric else 'asym'}{extra}"

    def record(self) -> dict:
        """The grid in four keys (what a quantized model and its artifacts record)."""
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def describe(self) -> str:
        """In words, e.g. ``4-bit GPTQ, group 128, symmetric``."""
        from .state import describe

        return describe(self.record())


__all__ = ["QuantConfig", "QuantSettings"]
