"""Property tests of tile grids, hybrid masks and the exact global budget (tilesparse.masks.tiles)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tilesparse.masks import (
    DENSE,
    SPARSE,
    ZERO,
    TileGrid,
    classify_tiles,
    density,
    hybrid_mask,
    select_dense_tiles,
    tile_density,
    topk_mask,
)


@st.composite
def grids(draw, max_dim=70, in_mult4=True):
    out = draw(st.integers(1, max_dim))
    inp = 4 * draw(st.integers(1, max_dim // 4)) if in_mult4 else draw(st.integers(1, max_dim))
    tr = draw(st.integers(1, 24))
    tc = 4 * draw(st.integers(1, 6))
    return TileGrid(out, inp, tr, tc)


@given(grids(in_mult4=False))
def test_grid_counts_partial_tiles_exactly(g):
    assert g.n_rows == math.ceil(g.out_features / g.tile_rows)
    assert g.n_cols == math.ceil(g.in_features / g.tile_cols)
    tn = g.tile_numel()
    assert tn.shape == g.shape
    assert int(tn.sum()) == g.numel
    assert (tn > 0).all()
    assert torch.equal(g.reduce_sum(torch.ones(g.out_features, g.in_features, dtype=torch.int64)), tn)
    ids = torch.arange(g.n_rows * g.n_cols).reshape(g.shape)
    full = g.expand(ids)
    assert full.shape == (g.out_features, g.in_features)
    r, c = g.out_features - 1, g.in_features - 1  # the last entry lies in the last (maybe partial) tile
    assert int(full[r, c]) == g.n_rows * g.n_cols - 1
    assert int(full[0, 0]) == 0


def test_grid_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 4"):
        TileGrid(8, 8, 4, 6)
    with pytest.raises(ValueError):
        TileGrid(0, 8)
    with pytest.raises(ValueError):
        TileGrid(8, 8, 0, 4)
    g = TileGrid(5, 8, 2, 4)
    with pytest.raises(ValueError):
        g.expand(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        g.reduce_sum(torch.zeros(4, 8))


@given(grids(), st.integers(0, 2**31 - 1))
def test_hybrid_mask_and_classify_round_trip(g, seed):
    gen = torch.Generator().manual_seed(seed)
    kinds = torch.randint(0, 3, g.shape, generator=gen).to(torch.int8)
    m24 = topk_mask(torch.randn(g.out_features, g.in_features, generator=gen))
    m = hybrid_mask(kinds, m24, g)
    full = g.expand(kinds)
    assert m[full == DENSE].all()
    assert not m[full == ZERO].any()
    assert torch.equal(m[full == SPARSE], m24[full == SPARSE])
    assert torch.equal(classify_tiles(m, g), kinds)
    # exact accounting: kept = dense tiles in full + half of the 2:4 tiles
    tn = g.tile_numel()
    expected = int(tn[kinds == DENSE].sum()) + int(tn[kinds == SPARSE].sum()) // 2
    assert int(m.sum()) == expected
    td = tile_density(m, g)
    assert torch.allclose(td[kinds == DENSE], torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(td[kinds == SPARSE], torch.tensor(0.5, dtype=torch.float64))
    assert abs(float((td * tn).sum()) / g.numel - density(m)) < 1e-12


def test_classify_rejects_unstructured_tile():
    g = TileGrid(4, 8, 4, 4)
    m = torch.ones(4, 8, dtype=torch.bool)
    m[0, 0] = False
    with pytest.raises(ValueError, match="neither"):
        classify_tiles(m, g)


@st.composite
def budget_cases(draw):
    n = draw(st.integers(1, 4))
    gs = [draw(grids(max_dim=60)) for _ in range(n)]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(g.shape, generator=gen, dtype=torch.float64) for g in gs]
    s = draw(st.floats(0.0, 0.5))
    return gs, scores, s


@given(budget_cases())
def test_budget_hits_target_within_one_tile(case):
    gs, scores, s = case
    res = select_dense_tiles(scores, gs, s)
    total = sum(g.numel for g in gs)
    # measured sparsity of the chosen hybrid masks
    kept = 0
    for g, d in zip(gs, res.dense):
        tn = g.tile_numel()
        kept += int(tn[d].sum()) + int(tn[~d].sum()) // 2
    measured = 1 - kept / total
    assert abs(measured - res.achieved_sparsity) < 1e-12
    biggest = max(int(g.tile_numel().max()) for g in gs)
    assert abs(measured - s) <= biggest / 2 / total + 1e-12  # within one tile of the target
    assert res.n_dense == sum(int(d.sum()) for d in res.dense)
    assert res.n_tiles == sum(g.n_rows * g.n_cols for g in gs)
    # the dense tiles are the best-scored ones, globally
    chosen = torch.cat([sc[d] for sc, d in zip(scores, res.dense)])
    rest = torch.cat([sc[~d] for sc, d in zip(scores, res.dense)])
    if chosen.numel() and rest.numel():
        assert float(chosen.min()) >= float(rest.max())


@given(budget_cases())
def test_budget_is_the_closest_count(case):
    gs, scores, s = case
    res = select_dense_tiles(scores, gs, s)
    total = sum(g.numel for g in gs)
    flat = torch.cat([sc.reshape(-1) for sc in scores])
    sizes = torch.cat([g.tile_numel().reshape(-1) for g in gs]).double()
    order = torch.sort(flat, descending=True, stable=True).indices
    sp = [(total / 2 - float(sizes[order[:k]].sum()) / 2) / total for k in range(len(order) + 1)]
    assert abs(res.achieved_sparsity - s) <= min(abs(x - s) for x in sp) + 1e-12


def test_budget_endpoints_and_disallowed_layers():
    gs = [TileGrid(16, 16, 8, 8), TileGrid(8, 6, 4, 4)]
    sc = [torch.rand(g.shape) for g in gs]
    all_sparse = select_dense_tiles(sc[:1], gs[:1], 0.5)
    assert all_sparse.n_dense == 0 and all_sparse.achieved_sparsity == 0.5
    all_dense = select_dense_tiles(sc[:1], gs[:1], 0.0)
    assert all_dense.n_dense == all_dense.n_tiles and all_dense.achieved_sparsity == 0.0
    res = select_dense_tiles(sc, gs, 0.5, sparse_allowed=[True, False])
    assert res.dense[1].all()  # the layer that cannot be 2:4 stays dense and counts as dense
    assert abs(res.achieved_sparsity - (16 * 16 / 2) / (16 * 16 + 48)) < 1e-12
    for bad in (-0.1, 0.6):
        with pytest.raises(ValueError):
            select_dense_tiles(sc[:1], gs[:1], bad)
    with pytest.raises(ValueError):
        select_dense_tiles([torch.rand(3, 3)], gs[:1], 0.3)


def _columns_uniform(d: torch.Tensor) -> bool:
    return bool((d.all(0) | ~d.any(0)).all())


@given(budget_cases())
def test_column_budget_takes_whole_tile_columns_best_first(case):
    gs, scores, s = case
    res = select_dense_tiles(scores, gs, s, tile_map="columns")
    total = sum(g.numel for g in gs)
    kept = sum(int(g.tile_numel()[d].sum()) + int(g.tile_numel()[~d].sum()) // 2 for g, d in zip(gs, res.dense))
    assert abs(1 - kept / total - res.achieved_sparsity) < 1e-12
    assert all(_columns_uniform(d) for d in res.dense)
    biggest = max(int(g.tile_numel().sum(0).max()) for g in gs)
    assert abs(res.achieved_sparsity - s) <= biggest / 2 / total + 1e-12  # within one tile-column
    col_scores = [sc.mean(0) for sc in scores]
    chosen = torch.cat([c[d[0]] for c, d in zip(col_scores, res.dense)])
    rest = torch.cat([c[~d[0]] for c, d in zip(col_scores, res.dense)])
    if chosen.numel() and rest.numel():
        assert float(chosen.min()) >= float(rest.max())


def test_column_budget_rejects_an_unknown_tile_map():
    g = TileGrid(16, 16, 8, 8)
    with pytest.raises(ValueError, match="tile map"):
        select_dense_tiles([torch.rand(g.shape)], [g], 0.3, tile_map="rows")
