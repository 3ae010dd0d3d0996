"""One real-model check (slow): a PATCH-Joint step on SmolLM2 hits the exact tile budget, reports 30
blocks, and its masks are as usable as the one-shot prior they start from."""

import math

import pytest


@pytest.mark.slow
def test_joint_on_default_model_hits_budget_and_matches_its_prior():
    import torch

    from tilesparse.data import eval_windows, load_text, tokenize
    from tilesparse.evaluation import perplexity
    from tilesparse.io import apply_masks
    from tilesparse.learning import build_final_maskset, learn_masks, make_config
    from tilesparse.learning.final import LayerFinal
    from tilesparse.learning.priors import magnitude_24, magnitude_unstructured
    from tilesparse.masks.nm import ids_from_mask
    from tilesparse.masks.tiles import TileGrid, tile_density
    from tilesparse.models import find_prunable_linears, load_model

    loaded = load_model()
    model = loaded.model
    ids = tokenize(loaded.tokenizer, load_text("austen-train").text)[:20000]
    cfg = make_config(mode="joint", sparsity=0.35, steps=1, seqlen=64, batch=1, prior="magnitude")
    res = learn_masks(model, cfg, ids, progress=False)
    ms = res.maskset
    assert len(ms) == 210 and all(m.pattern == "hybrid" for m in ms)
    assert abs(ms.sparsity() - 0.35) < 0.001  # exact global budget (one 128x128 tile = 0.00008)
    assert len(res.report["per_block"]) == 30
    # the one-shot magnitude hybrid mask the prior encodes
    linears = find_prunable_linears(model)
    prior = build_final_maskset([
        LayerFinal(l.name, g := TileGrid(l.out_features, l.in_features), ids_from_mask(magnitude_24(l.weight)),
                   tile_density(magnitude_unstructured(l.weight, 0.35), g)) for l in linears], 0.35)
    original = {l.name: l.weight.detach().clone() for l in linears}
    w = eval_windows(tokenize(loaded.tokenizer, load_text("prideprejudice").text), 256, 1)
    ppl = {}
    for name, masks in (("learned", ms), ("prior", prior)):
        apply_masks(model, masks)
        ppl[name] = perplexity(model, w, progress=False).perplexity
        for l in linears:
            l.set_weight(original[l.name])
    assert math.isfinite(ppl["learned"]) and ppl["learned"] < 2.0 * ppl["prior"], ppl
    same = sum(int(torch.equal(ms.layers[n].ids, prior.layers[n].ids)) for n in ms.layers)
    assert same == 0  # the random N(0, std) init flips a few groups in every layer ...
    agree = sum(int((ms.layers[n].ids == prior.layers[n].ids).sum()) for n in ms.layers)
    total = sum(prior.layers[n].ids.numel() for n in ms.layers)
    assert agree / total > 0.85  # ... but the prior dominates
