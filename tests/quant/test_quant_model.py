"""Fake-quantization of tiny models after a hybrid mask, through the pruning engine's calibration pass."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from tilesparse.errors import TilesparseError
from tilesparse.models import find_prunable_linears, weights_fingerprint
from tilesparse.pruning import PruneConfig, prune_model
from tilesparse.quant import QuantConfig, quantization_of, quantize_model

CALIB = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))


def _hybrid_mask(model):
    return prune_model(model, CALIB, PruneConfig(method="wanda", pattern="hybrid", sparsity=0.4, tile=16),
                       progress=False)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=CALIB).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores its weight transposed
def test_weights_are_the_dequantized_codes_zero_where_pruned(arch):
    model = make_tiny_model(arch)
    masks = _hybrid_mask(model)
    fp = weights_fingerprint(model)
    outside = {n: p.detach().clone() for n, p in model.named_parameters()
               if not any(n.startswith(l.name) for l in find_prunable_linears(model))}
    res = quantize_model(model, QuantConfig(method="gptq", group_size=24), masks, CALIB, progress=False)
    assert set(res.layers) == {l.name for l in find_prunable_linears(model)}
    for l in find_prunable_linears(model):
        q = res.layers[l.name]
        assert torch.equal(l.weight.detach(), q.dequantize()), l.name
        keep = masks.layers[l.name].to_bool()
        assert bool((l.weight[~keep] == 0).all())
        assert q.group_size == 24 and q.scales.shape[1] == -(-l.in_features // 24)  # 64 = 2 x 24 + 16
    assert all(torch.equal(p, outside[n]) for n, p in model.named_parameters() if n in outside)
    assert res.meta["base_fingerprint"] == fp and res.meta["masked"] and not res.meta["fallback_layers"]
    assert quantization_of(model) == {"method": "gptq", "bits": 4, "group_size": 24, "symmetric": True}
    with pytest.raises(TilesparseError, match="quantize needs the unquantized model"):
        quantize_model(model, QuantConfig(method="rtn"), masks, progress=False)


def test_gptq_stays_closer_to_the_masked_model_than_rtn():
    model = make_tiny_model("llama")
    masks = _hybrid_mask(model)
    from tilesparse.io import apply_masks

    apply_masks(model, masks)
    ref = _logits(model)
    err = {}
    for method in ("rtn", "gptq"):
        m = make_tiny_model("llama")
        quantize_model(m, QuantConfig(method=method, group_size=32), masks, CALIB, progress=False)
        err[method] = float((_logits(m) - ref).pow(2).mean())
    assert err["gptq"] < 0.85 * err["rtn"]


def test_dense_quantization_and_bad_input():
    model = make_tiny_model("llama")
    res = quantize_model(model, QuantConfig(method="rtn", bits=8, symmetric=False), progress=False)
    assert not res.meta["masked"] and "calibration" not in res.meta
    for l in find_prunable_linears(model):
        assert torch.equal(l.weight.detach(), res.layers[l.name].dequantize())
    other = _hybrid_mask(make_tiny_model("llama", layers=1))
    with pytest.raises(TilesparseError, match="gptq needs calibration data"):
        quantize_model(make_tiny_model("llama"), QuantConfig(), other)
    with pytest.raises(TilesparseError, match="the mask has no layer"):
        quantize_model(make_tiny_model("llama"), QuantConfig(method="rtn"), other)
    for kw, msg in (({"group_size": 0}, "'group_size' must be > 0, got 0"),
                    ({"bits": 5}, "bits must be one of 2, 3, 4, 8, got 5"),
                    ({"method": "awq"}, "'method' must be one of rtn, gptq")):
        with pytest.raises(TilesparseError, match=msg):
            QuantConfig(**kw)
