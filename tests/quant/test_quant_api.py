"""``tilesparse.quantize`` as users call it, on a tiny model after a hybrid mask."""

from __future__ import annotations

import pytest
import torch

import tilesparse as ts
from tilesparse.models import find_prunable_linears


def test_quantize_after_prune_saves_what_eval_reads_and_learn_refuses_it(tiny_model_dir, text_file, tmp_path):
    lm = ts.load_model(str(tiny_model_dir))
    masks = ts.prune(lm, method="magnitude", pattern="hybrid", sparsity=0.3, tile=32, progress=False)
    res = ts.quantize(lm, masks, method="gptq", group_size=32, calibration=str(text_file), samples=2, seqlen=32,
                      out_dir=tmp_path / "q", progress=False)
    assert res.config.method == "gptq" and res.meta["calibration"]["samples"] == 2
    for l in find_prunable_linears(lm.model):
        assert torch.equal(l.weight.detach(), res.layers[l.name].dequantize())
        assert bool((l.weight[~masks.layers[l.name].to_bool()] == 0).all())
    ppl = ts.perplexity(lm, str(text_file), seqlen=64, windows=2, progress=False).perplexity
    # the folder holds the same model: the base model with its mask and dequantized weights applied
    from tilesparse.io.export import apply_mask_dir

    back = ts.load_model(str(tiny_model_dir))
    apply_mask_dir(back, tmp_path / "q")
    assert ts.perplexity(back, str(text_file), seqlen=64, windows=2, progress=False).perplexity == ppl
    for model in (lm, back):
        with pytest.raises(ts.TilesparseError, match="learn needs the unquantized model"):
            ts.learn(model, mode="joint", sparsity=0.3, text=str(text_file), prior="magnitude", steps=1)
        with pytest.raises(ts.TilesparseError, match="quantize needs the unquantized model"):
            ts.quantize(model, method="rtn")


def test_quantize_settings_are_checked(tiny_model_dir):
    lm = ts.load_model(str(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with pytest.raises(ts.TilesparseError, match="'group_size' must be > 0, got 0"):
        ts.quantize(lm, method="rtn", group_size=0)
    with pytest.raises(ts.TilesparseError, match="bits must be one of 2, 3, 4, 8, got 16"):
        ts.quantize(lm, method="rtn", bits=16)
    with pytest.raises(ts.TilesparseError, match="not both"):
        ts.quantize(lm, None, ts.QuantConfig(method="rtn"), bits=4)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # refused before any change
