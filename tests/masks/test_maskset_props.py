"""Property tests of LayerMask / MaskSet accounting (tilesparse.masks.maskset)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tilesparse.masks import SPARSE, TileGrid, ids_from_mask, is_2to4, topk_mask
from tilesparse.masks.maskset import LayerMask, MaskSet


@st.composite
def layer_masks(draw, name="l"):
    out = draw(st.integers(1, 40))
    inp = 4 * draw(st.integers(1, 12))
    tile = (draw(st.integers(1, 16)), 4 * draw(st.integers(1, 5)))
    pattern = draw(st.sampled_from(["unstructured", "2:4", "hybrid", "dense"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kw = {}
    if pattern == "unstructured":
        kw["keep"] = torch.rand(out, inp, generator=gen) > draw(st.floats(0, 1))
    if pattern in ("2:4", "hybrid"):
        kw["ids"] = ids_from_mask(topk_mask(torch.randn(out, inp, generator=gen)))
    if pattern == "hybrid":
        kw["kinds"] = torch.randint(0, 3, TileGrid(out, inp, *tile).shape, generator=gen).to(torch.int8)
    return LayerMask(name, out, inp, pattern, tile, **kw)


@given(layer_masks())
def test_kept_matches_materialised_mask(lm):
    m = lm.to_bool()
    assert m.shape == (lm.out_features, lm.in_features) and m.dtype == torch.bool
    assert lm.kept() == int(m.sum())
    assert abs(lm.sparsity - (1 - float(m.double().mean()))) < 1e-12
    if lm.pattern == "2:4":
        assert is_2to4(m)
    if lm.pattern != "unstructured":
        k = lm.tile_kinds()
        assert k.shape == lm.grid.shape
        if lm.pattern == "2:4":
            assert (k == SPARSE).all()


@given(st.lists(layer_masks(), min_size=1, max_size=4))
def test_maskset_sparsity_is_numel_weighted(lms):
    ms = MaskSet({f"l{i}": LayerMask(f"l{i}", m.out_features, m.in_features, m.pattern, m.tile,
                                     kinds=m.kinds, ids=m.ids, keep=m.keep) for i, m in enumerate(lms)})
    bools = ms.to_bool()
    kept = sum(int(b.sum()) for b in bools.values())
    total = sum(b.numel() for b in bools.values())
    assert abs(ms.sparsity() - (1 - kept / total)) < 1e-12
    assert set(ms.per_layer()) == set(bools) and len(ms) == len(lms)


def test_layer_mask_validation():
    with pytest.raises(ValueError):
        LayerMask("x", 4, 8, "nonsense")
    with pytest.raises(ValueError):
        LayerMask("x", 4, 8, "unstructured", keep=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        LayerMask("x", 4, 6, "2:4", ids=torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError):
        LayerMask("x", 4, 8, "hybrid", (4, 4), ids=torch.zeros(4, 2, dtype=torch.uint8),
                  kinds=torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="no tile map"):
        LayerMask("x", 4, 8, "unstructured", keep=torch.ones(4, 8, dtype=torch.bool)).tile_kinds()
