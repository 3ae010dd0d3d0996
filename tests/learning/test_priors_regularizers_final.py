import pytest
import torch

from tilesparse.learning.final import (LayerFinal, build_final_maskset, density_report, final_pattern_ids,
                                       format_density_report)
from tilesparse.learning.priors import (magnitude_24, magnitude_unstructured, pattern_prior_logits,
                                        tile_prior_logits)
from tilesparse.learning.regularizers import density_penalty, magnitude_bonus, magnitude_decay
from tilesparse.masks.nm import candidate_overlap, ids_from_mask, is_2to4
from tilesparse.masks.tiles import DENSE, SPARSE, TileGrid


def test_tile_prior_marks_densest_tiles_at_layer_target():
    grid = TileGrid(8, 16, 4, 4)  # 2 x 4 equal tiles
    keep = torch.zeros(8, 16, dtype=torch.bool)
    # density per tile: (0,1) and (1,3) are full, the rest empty -> these two should start dense
    keep[0:4, 4:8] = True
    keep[4:8, 12:16] = True
    pri = tile_prior_logits(keep, grid, 0.25, std=0.01, strength=3.0)
    # f_dense = 1 - 2s = 0.5 -> 4 of 8 tiles dense; the two full ones must be among them
    assert int((pri > 0).sum()) == 4
    assert pri[0, 1] > 0 and pri[1, 3] > 0
    assert torch.allclose(pri.abs(), torch.full_like(pri, 0.03))


def test_pattern_prior_follows_overlap_and_argmax_returns_one_shot_ids():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    m24 = magnitude_24(w)
    pri = pattern_prior_logits(m24, std=0.014, strength=3.0)
    ov = candidate_overlap(m24)
    assert torch.allclose(pri, (ov.float() - 1) * 0.042)
    assert torch.equal(final_pattern_ids(pri), ids_from_mask(m24))


def test_magnitude_masks():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 2.0, -0.1, 0.2, 5.0]])
    assert magnitude_unstructured(w, 0.5).tolist() == [[False, True, True, False, True, False, False, True]]
    m = magnitude_24(w)
    assert is_2to4(m) and m.tolist() == [[False, True, True, False, True, False, False, True]]


def test_density_penalty_and_magnitude_bonus():
    assert density_penalty(torch.tensor(0.6), 0.55, 7.0).item() == pytest.approx(0.35)
    assert density_penalty([torch.tensor(0.5), torch.tensor(0.7)], 0.55, 2.0).item() == pytest.approx(0.2)
    assert magnitude_decay(0, 10) == 1.0 and magnitude_decay(5, 10) == 0.5 and magnitude_decay(10, 10) == 0.0
    b = magnitude_bonus(torch.tensor(8.0), 10.0, 10.0, 5, 10)
    assert b.item() == pytest.approx(-4.0)


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = [TileGrid(64, 48, 16, 16), TileGrid(40, 64, 16, 16)]  # second has partial tile rows
    out = []
    for i, gr in enumerate(grids):
        ids = torch.randint(0, 6, (gr.out_features, gr.in_features // 4), generator=g).to(torch.uint8)
        out.append(LayerFinal(f"l{i}", gr, ids, torch.randn(gr.shape, generator=g)))
    return out


@pytest.mark.parametrize("target", [0.0, 0.25, 0.35, 0.45, 0.5])
def test_final_maskset_hits_exact_global_budget(target):
    layers = _layers()
    ms = build_final_maskset(layers, target)
    assert all(m.pattern == "hybrid" for m in ms)
    # the budget is the closest achievable: no other number of dense tiles is closer
    tile_sizes = sorted(int(x) for lf in layers for x in lf.grid.tile_numel().reshape(-1))
    total = sum(lf.grid.numel for lf in layers)
    assert abs(ms.sparsity() - target) <= max(tile_sizes) / 2 / total + 1e-12
    assert ms.meta["achieved_sparsity"] == pytest.approx(ms.sparsity())
    # dense tiles are exactly the globally highest-scored ones
    scores = torch.cat([lf.tile_scores.reshape(-1) for lf in layers])
    kinds = torch.cat([ms.layers[lf.name].kinds.reshape(-1) for lf in layers])
    if 0 < int((kinds == DENSE).sum()) < kinds.numel():
        assert scores[kinds == DENSE].min() >= scores[kinds == SPARSE].max()
    for lf in layers:  # 2:4 part is the given ids
        assert torch.equal(ms.layers[lf.name].ids, lf.ids)


def test_final_maskset_not_a_zero_threshold():
    layers = _layers(1)
    for lf in layers:
        lf.tile_scores = lf.tile_scores.abs() + 1.0  # all logits > 0: thresholding would keep all dense
    ms = build_final_maskset(layers, 0.45)
    assert ms.sparsity() == pytest.approx(0.45, abs=0.02)


def test_maskllm_final_is_all_2to4_and_report():
    layers = _layers()
    ms = build_final_maskset(layers, 0.5, all_sparse=True)
    assert all(m.pattern == "2:4" for m in ms) and ms.sparsity() == 0.5
    rep = density_report(ms, {"l0": 0, "l1": 1})
    assert rep["per_block"] == {0: 0.5, 1: 0.5} and rep["sparsity"] == 0.5
    assert "block   1" in format_density_report(rep)


def test_final_maskset_round_trips_through_artifact(tmp_path):
    from tilesparse.io import load_mask_artifact, save_mask_artifact

    ms = build_final_maskset(_layers(), 0.35, meta={"method": "PATCH-Joint"})
    path = save_mask_artifact(ms, tmp_path)
    back = load_mask_artifact(path)
    assert back.sparsity() == pytest.approx(ms.sparsity())
    for m in ms:
        assert torch.equal(back.layers[m.name].to_bool(), m.to_bool())


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_one_shot_adapter_gives_prior_masks_and_leaves_weights(method):
    from conftest import make_tiny_model
    from tilesparse.learning.priors import one_shot_masks
    from tilesparse.models import find_prunable_linears, weights_fingerprint

    model = make_tiny_model("llama")
    before = weights_fingerprint(model)
    linears = find_prunable_linears(model)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    shots = one_shot_masks(model, linears, calib, method=method, sparsity=0.35, need_unstructured=True,
                           need_24=True, progress=False)
    assert weights_fingerprint(model) == before
    assert set(shots.two_four) == set(shots.unstructured) == {l.name for l in linears}
    for l in linears:
        assert is_2to4(shots.two_four[l.name])
        kept = shots.unstructured[l.name].float().mean().item()
        assert kept == pytest.approx(0.65, abs=0.02)
