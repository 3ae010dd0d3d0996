"""Fake-quantization of a whole model: the dequantized weights written into its prunable linears, after the mask.

Round-to-nearest needs no data; GPTQ runs the calibration pass of the pruning engine
(:func:`~tilesparse.pruning.update_layers`, the pass :func:`~tilesparse.pruning.refit_weights` uses): blocks
in order, each layer's Hessian from the outputs of the blocks already quantized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TilesparseError
from ..masks.maskset import MaskSet
from ..models import find_prunable_linears, weights_fingerprint
from .config import QuantConfig
from .gptq import quantize_gptq
from .rtn import QuantizedTensor, quantize_rtn
from .state import check_not_quantized, mark_quantized


@dataclass
class ModelQuantization:
    """The integer form of every quantized linear of a model (``{layer name: QuantizedTensor}``), the
    config used and provenance (``meta``: base-model fingerprint, timings, GPTQ fallbacks)."""

    layers: dict[str, QuantizedTensor]
    config: QuantConfig
    meta: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What the model's config records about its quantization."""
        return self.config.record()


def _keeps(model: nn.Module, masks: MaskSet | None) -> dict[str, torch.Tensor | None]:
    layers = find_prunable_linears(model)
    if masks is None:
        return {l.name: None for l in layers}
    for l in layers:
        lm = masks.layers.get(l.name)
        if lm is None:
            raise TilesparseError(f"the mask has no layer {l.name} of this model")
        if (lm.out_features, lm.in_features) != (l.out_features, l.in_features):
            raise TilesparseError(f"the mask is for a different model: {l.name} is {l.out_features}x"
                                  f"{l.in_features} here, {lm.out_features}x{lm.in_features} in the mask")
    return {l.name: None if masks.layers[l.name].pattern == "dense" else masks.layers[l.name].to_bool()
            for l in layers}


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig, masks: MaskSet | None = None,
                   calib_ids: torch.Tensor | None = None, *, progress: bool = True) -> ModelQuantization:
    """Quantize the prunable linears of ``model`` in place (fake-quant: the dequantized weights replace them).

    With ``masks`` the pruned weights are zeroed first and stay exactly 0; they take no part in their
    group's scale. ``calib_ids`` (``LongTensor[n, seqlen]``) feeds GPTQ and is ignored by round-to-nearest.
    The model is marked as quantized (:func:`~tilesparse.quant.state.quantization_of`); quantizing it again
    is refused. Returns the codes, scales and zero points of every layer.
    """
    check_not_quantized(model, "quantize")
    if config.needs_calibration and calib_ids is None:
        raise TilesparseError(f"{config.method} needs calibration data")
    keeps = _keeps(model, masks)
    base_fp = weights_fingerprint(model)
    layers = find_prunable_linears(model)
    for l in layers:
        if keeps[l.name] is not None:
            l.apply_mask(keeps[l.name])
    kw = dict(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric, observer=config.observer)
    out: dict[str, QuantizedTensor] = {}
    t0 = time.perf_counter()
    if config.method == "rtn":
        for l in tqdm(layers, desc=config.label(), unit="layer", disable=not progress):
            res = quantize_rtn(l.weight.detach(), keeps[l.name], **kw)
            l.set_weight(res.weight)
            out[l.name] = _to_cpu(res.quantized)
        infos: dict[str, dict] = {}
    else:
        def update(layer, weight, hessian):
            res = quantize_gptq(weight, hessian, keeps[layer.name], blocksize=config.blocksize, damp=config.damp,
                                act_order=config.act_order, name=layer.name, **kw)
            out[layer.name] = _to_cpu(res.quantized)
            return res.weight, {"damp": res.damp, "fallback": res.fallback, "error": res.error}

        from ..pruning import update_layers

        infos = update_layers(model, calib_ids, update, desc=config.label(), tokens_per_batch=config.tokens_per_batch,
                              progress=progress)
    meta = {"base_fingerprint": base_fp, "config": config.to_dict(), "seconds": time.perf_counter() - t0,
            "masked": masks is not None}
    if config.method == "gptq":
        meta["calibration"] = {"samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1])}
        meta["fallback_layers"] = [n for n, i in infos.items() if i.get("fallback")]
        meta["extra_damping_layers"] = [n for n, i in infos.items()
                                        if not i.get("fallback") and i.get("damp", config.damp) != config.damp]
    mark_quantized(model, config.record())
    return ModelQuantization({l.name: out[l.name] for l in layers}, config, meta)


def _to_cpu(q: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor(q.codes.cpu(), q.scales.cpu(), q.zeros.cpu(), q.bits, q.group_size, q.symmetric)


__all__ = ["ModelQuantization", "quantize_model"]
