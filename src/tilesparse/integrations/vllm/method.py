"""The ``tilesparse`` quantization config and linear method for vLLM (imports vLLM; see the package doc)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import regex as re
import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.utils import set_weight_attrs

from ...kernels.format import PackedHybrid
from ...kernels.linear import HybridLinear
from . import QUANT_METHOD, UnsupportedExport, check_format, read_packed_header

_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


class TileSparseConfig(QuantizationConfig):
    """vLLM quantization config for tilesparse packed exports.

    Built from the ``quantization_config`` of the export's ``config.json`` (:meth:`from_config`, which checks
    the format version); :meth:`maybe_update_config` then reads the packed file's header to learn which
    linears are packed. Linears the export keeps dense load as vLLM's unquantized linears.
    """

    def __init__(self, format_version: int | None = None, packed_file: str = "model.packed.safetensors"):
        super().__init__()
        self.format_version = format_version
        self.packed_file = packed_file
        self.packed_layers: dict[str, dict] | None = None  # HF module name -> shape / tile info (from the header)

    def __repr__(self) -> str:
        n = "?" if self.packed_layers is None else len(self.packed_layers)
        return f"TileSparseConfig(format_version={self.format_version}, packed_layers={n})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the torch reference runs anywhere; the kernels pick themselves per device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # all in config.json's quantization_config (or defaults with quantization="tilesparse")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TileSparseConfig":
        version = config.get("format_version")
        if version is not None or config.get("format") is not None:
            check_format(config.get("format"), version if version is not None else 1, "config.json")
        return cls(format_version=None if version is None else int(version),
                   packed_file=config.get("packed_file", "model.packed.safetensors"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Read the packed file's header (format, version, packed layers); a local folder or a hub repository."""
        path = Path(model_name) / self.packed_file
        if not Path(model_name).is_dir():
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(model_name, self.packed_file, revision=revision))
            except Exception as exc:
                raise UnsupportedExport(f"tilesparse: cannot get {self.packed_file} of {model_name}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        meta = read_packed_header(path)
        self.packed_layers = dict(meta.get("layers", {}))

    @staticmethod
    def get_checkpoint_weight_mapper() -> WeightsMapper:
        """Map the packed file's names to vLLM's: ``layer::field`` -> ``layer.field``, ``state::key`` -> ``key``;
        ``buffer::*`` (rotary tables, which vLLM computes itself) are dropped."""
        return WeightsMapper(orig_to_new_regex={re.compile(r"^buffer::.*$"): None, re.compile(r"^state::"): "",
                                                re.compile(r"::"): "."},
                             orig_to_new_suffix={".g_idx": None})

    def hf_parts(self, prefix: str) -> list[str]:
        """The HF module names behind a vLLM module (``...qkv_proj`` -> ``...q_proj``, ``...k_proj``, ``...v_proj``)."""
        base, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last, [last])
        return [f"{base}.{p}" if base else p for p in parts]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        packed = self.packed_layers
        if packed is None:
            raise UnsupportedExport("tilesparse: the packed file's header was not read (maybe_update_config)")
        if isinstance(layer, LinearBase):
            parts = self.hf_parts(prefix)
            have = [p in packed for p in parts]
            if not any(have):
                return UnquantizedLinearMethod()
            if not all(have):
                kinds = ", ".join(f"{p.rpartition('.')[2]} {'packed' if h else 'dense'}" for p, h in zip(parts, have))
                raise UnsupportedExport(f"tilesparse: vLLM fuses {prefix} from parts stored differently ({kinds}); "
                                        "export all of them packed")
            return TileSparseLinearMethod(self, parts)
        hit = [n for n in packed if n == prefix or n.startswith(prefix + ".")]
        if hit and prefix:
            raise UnsupportedExport(f"tilesparse: packed layer {hit[0]} is a {type(layer).__name__} in vLLM, "
                                    "which this plugin cannot serve packed (only linear layers)")
        return None


def _shard_index(shard_id, n_parts: int, prefix: str) -> int:
    if shard_id is None:
        if n_parts != 1:
            raise UnsupportedExport(f"tilesparse: {prefix}: a pre-fused weight for a fused layer is not supported")
        return 0
    if isinstance(shard_id, str):
        return _QKV_SHARDS[shard_id]
    if isinstance(shard_id, tuple):
        raise UnsupportedExport(f"tilesparse: {prefix}: a pre-fused weight for a fused layer is not supported")
    return int(shard_id)


def _field_loader(layer: nn.Module, field: str):
    """A weight loader for one stored field; takes both call shapes, ``(param, w)`` and ``(param, w, shard_id)``
    (the fused q/k/v and gate/up layers). The field's length varies from layer to layer, so the tensor is kept
    as it comes and the layer is built in ``process_weights_after_loading``."""

    def loader(param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        idx = _shard_index(loaded_shard_id, len(layer._ts_parts), layer.prefix)
        layer._ts_loaded.setdefault(idx, {})[field] = loaded_weight.detach().to(param.device, copy=True)

    return loader


class TileSparseLinearMethod(LinearMethodBase):
    """A linear layer (fused or not) whose parts are packed hybrid weights: one :class:`HybridLinear` per part,
    outputs concatenated in vLLM's order (q, k, v / gate, up)."""

    def __init__(self, quant_config: TileSparseConfig, parts: list[str]):
        self.quant_config = quant_config
        self.parts = parts

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        tp = int(getattr(layer, "tp_size", 1) or 1)
        if tp > 1:
            raise ValueError(f"tilesparse: tensor parallelism is not supported (tensor_parallel_size={tp}); "
                             "serve the packed export with tensor_parallel_size=1")
        if len(output_partition_sizes) != len(self.parts):
            raise UnsupportedExport(f"tilesparse: {layer.prefix}: vLLM builds {len(output_partition_sizes)} parts, "
                                    f"the export names {len(self.parts)}")
        for part, out in zip(self.parts, output_partition_sizes):
            info = self.quant_config.packed_layers[part]
            shape = (int(info["out_features"]), int(info["in_features"]))
            if shape != (out, input_size_per_partition):
                raise UnsupportedExport(f"tilesparse: {part}: packed shape {shape} != vLLM's "
                                        f"{(out, input_size_per_partition)}")
        extra_weight_attrs.pop("weight_loader", None)  # vLLM's loaders expect fixed shapes
        layer._ts_parts = list(self.parts)
        layer._ts_loaded = {}
        layer._ts_dtype = params_dtype
        for field in PackedHybrid.STORED:  # empty placeholders: the lengths are known only when loading
            p = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            set_weight_attrs(p, extra_weight_attrs)
            set_weight_attrs(p, {"weight_loader": _field_loader(layer, field)})
            layer.register_parameter(field, p)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        mods = []
        for i, part in enumerate(layer._ts_parts):
            got = layer._ts_loaded.get(i, {})
            missing = [f for f in PackedHybrid.STORED if f not in got]
            if missing:
                raise UnsupportedExport(f"tilesparse: {part}: the packed file misses {', '.join(missing)}")
            info = self.quant_config.packed_layers[part]
            try:
                p = PackedHybrid(out_features=int(info["out_features"]), in_features=int(info["in_features"]),
                                 tile_rows=int(info["tile_rows"]), tile_cols=int(info["tile_cols"]), **got)
            except ValueError as exc:
                raise UnsupportedExport(f"tilesparse: {part}: {exc}") from None
            if p.dtype != layer._ts_dtype:
                p = p.to(dtype=layer._ts_dtype)
            mods.append(HybridLinear(p))
        for field in PackedHybrid.STORED:
            del layer._parameters[field]
        layer.ts_parts = nn.ModuleList(mods)
        layer._ts_loaded = {}

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = layer.ts_parts
        y = parts[0](x) if len(parts) == 1 else torch.cat([m(x) for m in parts], dim=-1)
        return y if bias is None else y + bias


__all__ = ["TileSparseConfig", "TileSparseLinearMethod"]
