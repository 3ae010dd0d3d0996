"""Pure scoring / selection math of one-shot pruning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilesparse.errors import TilesparseError
from tilesparse.masks import DENSE, SPARSE, TileGrid, classify_tiles, is_2to4, tile_density
from tilesparse.pruning import (
    PruneConfig,
    hybrid_tile_kinds,
    magnitude_scores,
    parse_tile,
    select_2to4,
    select_hybrid,
    select_unstructured,
    wanda_scores,
)

settings.register_profile("tilesparse", max_examples=60, deadline=None)
settings.load_profile("tilesparse")


@st.composite
def matrices(draw):
    out, inp = draw(st.integers(1, 24)), 4 * draw(st.integers(1, 10))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(out, inp, generator=gen)


def test_wanda_and_magnitude_scores():
    w = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    sq = torch.tensor([4.0, 9.0], dtype=torch.float64)
    assert torch.equal(magnitude_scores(w), w.abs())
    assert torch.allclose(wanda_scores(w, sq), torch.tensor([[2.0, 6.0], [6.0, 12.0]]))
    with pytest.raises(ValueError):
        wanda_scores(w, torch.ones(3))


@given(matrices(), st.floats(0.0, 0.99), st.sampled_from(["row", "layer"]))
def test_select_unstructured_exact_count_and_order(x, s, scope):
    keep = select_unstructured(x, s, scope)
    if scope == "row":
        k = round(s * x.shape[1])
        assert ((~keep).sum(1) == k).all()
        for r in range(x.shape[0]):
            if 0 < k < x.shape[1]:
                assert float(x[r][~keep[r]].max()) <= float(x[r][keep[r]].min())
    else:
        k = round(s * x.numel())
        assert int((~keep).sum()) == k
        if 0 < k < x.numel():
            assert float(x[~keep].max()) <= float(x[keep].min())


def test_select_unstructured_rejects_bad_sparsity():
    with pytest.raises(ValueError):
        select_unstructured(torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError):
        select_unstructured(torch.ones(2, 4), 0.5, "column")


@given(matrices(), st.integers(0, 2**31 - 1))
def test_select_2to4_and_hybrid(x, seed):
    assert is_2to4(select_2to4(x))
    g = TileGrid(x.shape[0], x.shape[1], 4, 8)
    kinds = torch.randint(0, 3, g.shape, generator=torch.Generator().manual_seed(seed)).to(torch.int8)
    m = select_hybrid(x, kinds, g)
    assert torch.equal(classify_tiles(m, g), kinds)
    full = g.expand(kinds)
    assert torch.equal(m[full == SPARSE], select_2to4(x)[full == SPARSE])


@given(st.lists(matrices(), min_size=1, max_size=3), st.floats(0.0, 0.5))
def test_hybrid_tile_kinds_follow_prior_density(ws, s):
    grids = [TileGrid(w.shape[0], w.shape[1], 4, 8) for w in ws]
    priors = [select_unstructured(w.abs(), s, "layer") for w in ws]
    kinds, budget = hybrid_tile_kinds(priors, grids, s)
    total = sum(g.numel for g in grids)
    kept = sum(int(g.tile_numel()[k == DENSE].sum()) + int(g.tile_numel()[k == SPARSE].sum()) // 2
               for g, k in zip(grids, kinds))
    assert abs((1 - kept / total) - budget.achieved_sparsity) < 1e-12
    assert abs(budget.achieved_sparsity - s) <= max(int(g.tile_numel().max()) for g in grids) / 2 / total + 1e-12
    dens = [tile_density(p, g) for p, g in zip(priors, grids)]
    chosen = torch.cat([d[k == DENSE] for d, k in zip(dens, kinds)])
    rest = torch.cat([d[k == SPARSE] for d, k in zip(dens, kinds)])
    if chosen.numel() and rest.numel():
        assert float(chosen.min()) >= float(rest.max())  # the densest prior tiles become dense


def test_hybrid_tile_kinds_keeps_non_24_layers_dense():
    g = [TileGrid(8, 8, 4, 4), TileGrid(8, 6, 4, 4)]
    kinds, budget = hybrid_tile_kinds([torch.ones(8, 8, dtype=torch.bool), None], g, 0.5)
    assert (kinds[1] == DENSE).all() and (kinds[0] == SPARSE).all()
    assert abs(budget.achieved_sparsity - 32 / 112) < 1e-12


@pytest.mark.parametrize("kwargs, match", [
    (dict(pattern="hybrid", sparsity=0.6), r"\[0, 0.5\]"),
    (dict(pattern="hybrid", sparsity=-0.1), r"\[0, 0.5\]"),
    (dict(pattern="hybrid"), "needs a target"),
    (dict(pattern="unstructured", sparsity=1.0), r"\[0, 1\)"),
    (dict(pattern="2:4", sparsity=0.3), "exactly 50"),
    (dict(tile=(128, 6)), "multiple of 4"),
    (dict(tile="64x"), "integer"),
    (dict(tile=0), "positive"),
    (dict(method="obs"), "'method' must be one of magnitude, wanda, sparsegpt, got 'obs'"),
    (dict(pattern="3:4"), r"'pattern' must be one of .* \(did you mean '2:4'\?\)"),
    (dict(method="wanda", update_weights=True), "sparsegpt"),
    (dict(damp=0.0), "'damp' must be > 0"),
    (dict(blocksize=30), "multiple of 4"),
    (dict(sparsity="half", pattern="unstructured"), "'sparsity' must be a number"),
])
def test_config_rejects_bad_input(kwargs, match):
    with pytest.raises(TilesparseError, match=match):
        PruneConfig(**kwargs)


def test_config_defaults_and_tile_parsing():
    c = PruneConfig(method="wanda", pattern="unstructured")
    assert c.sparsity == 0.5 and c.tile == (128, 128) and c.scope == "row"
    assert PruneConfig(method="magnitude", pattern="unstructured").scope == "layer"
    assert parse_tile("64x128") == (64, 128) and parse_tile(32) == (32, 32) and parse_tile((16, 8)) == (16, 8)
    assert PruneConfig(pattern="hybrid", sparsity=0.35).label() == "sparsegpt hybrid 35%"
