"""Property tests of the 2:4 mask math (tilesparse.masks.nm)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilesparse.masks import (
    N_PATTERNS,
    PATTERNS,
    NotTwoFourError,
    candidate_overlap,
    check_2to4,
    ids_from_mask,
    is_2to4,
    mask_from_ids,
    pack_ids,
    topk_mask,
    unpack_ids,
)

settings.register_profile("tilesparse", max_examples=60, deadline=None)
settings.load_profile("tilesparse")

dims = st.integers(min_value=1, max_value=9)


@st.composite
def id_tensors(draw, max_rows=9, max_groups=9):
    r, g = draw(st.integers(1, max_rows)), draw(st.integers(1, max_groups))
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.randint(0, N_PATTERNS, (r, g), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


@st.composite
def score_tensors(draw):
    r, g = draw(dims), draw(dims)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(r, 4 * g, generator=gen)
    if draw(st.booleans()):  # many ties
        x = torch.round(x)
    return x


def test_patterns_table():
    assert PATTERNS.shape == (6, 4)
    assert (PATTERNS.sum(1) == 2).all()
    assert len({tuple(p.tolist()) for p in PATTERNS}) == 6  # all six candidates, no duplicate


@given(score_tensors())
def test_topk_mask_every_group_keeps_exactly_two_highest(x):
    m = topk_mask(x)
    assert m.dtype == torch.bool and m.shape == x.shape
    g = m.reshape(x.shape[0], -1, 4)
    assert (g.sum(-1) == 2).all()  # every sparse group has exactly two zeros
    xs = x.reshape(x.shape[0], -1, 4)
    kept_min = torch.where(g, xs, torch.full_like(xs, float("inf"))).amin(-1)
    pruned_max = torch.where(~g, xs, torch.full_like(xs, float("-inf"))).amax(-1)
    assert (kept_min >= pruned_max).all()
    assert is_2to4(m)
    check_2to4(m)


def test_topk_mask_ties_prefer_lower_position():
    assert topk_mask(torch.zeros(1, 4)).tolist() == [[True, True, False, False]]


@given(id_tensors())
def test_ids_mask_round_trip(ids):
    m = mask_from_ids(ids)
    assert m.shape == (ids.shape[0], ids.shape[1] * 4)
    assert is_2to4(m)
    assert torch.equal(ids_from_mask(m), ids)


@given(score_tensors())
def test_mask_ids_round_trip(x):
    m = topk_mask(x)
    assert torch.equal(mask_from_ids(ids_from_mask(m)), m)


@given(id_tensors(max_rows=40, max_groups=40))
def test_pack_unpack_round_trip(ids):
    packed = pack_ids(ids)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (3 * ids.numel() + 7) // 8  # 3 bits per id
    assert torch.equal(unpack_ids(packed, ids.shape), ids)


def test_pack_empty_and_bad_inputs():
    empty = torch.zeros(0, dtype=torch.uint8)
    assert pack_ids(empty).numel() == 0
    assert unpack_ids(pack_ids(empty), (0,)).numel() == 0
    with pytest.raises(ValueError):
        pack_ids(torch.tensor([6], dtype=torch.uint8))
    packed = pack_ids(torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes"):
        unpack_ids(packed[:-1], (3,))
    with pytest.raises(ValueError, match="corrupt"):
        unpack_ids(torch.tensor([0b111], dtype=torch.uint8), (1,))  # id 7 does not exist


@given(score_tensors(), st.data())
def test_non_2to4_masks_are_rejected(x, data):
    m = topk_mask(x)
    r = data.draw(st.integers(0, m.shape[0] - 1))
    c = data.draw(st.integers(0, m.shape[1] - 1))
    bad = m.clone()
    bad[r, c] = ~bad[r, c]  # the group now keeps 1 or 3
    assert not is_2to4(bad)
    with pytest.raises(NotTwoFourError, match="not 2:4"):
        check_2to4(bad)
    with pytest.raises(NotTwoFourError):
        ids_from_mask(bad)


def test_check_2to4_wrong_width():
    with pytest.raises(NotTwoFourError, match="multiple of 4"):
        check_2to4(torch.ones(2, 6, dtype=torch.bool))
    assert not is_2to4(torch.ones(2, 6, dtype=torch.bool))


@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_candidate_overlap(groups, seed):
    gen = torch.Generator().manual_seed(seed)
    any_mask = torch.rand(3, 4 * groups, generator=gen) > 0.5
    ov = candidate_overlap(any_mask)
    assert ov.shape == (3, groups, 6)
    # every position belongs to exactly 3 of the 6 candidates
    assert torch.equal(ov.sum(-1), 3 * any_mask.reshape(3, groups, 4).sum(-1))
    ids = torch.randint(0, 6, (3, groups), generator=gen)
    ov2 = candidate_overlap(mask_from_ids(ids))
    assert (ov2.gather(-1, ids[..., None]) == 2).all()  # a pattern overlaps itself fully
    assert ((ov2 == 2).sum(-1) == 1).all()  # and no other candidate does
    assert (ov2 >= 0).all() and (ov2 <= 2).all()


def test_mask_from_ids_rejects_out_of_range():
    with pytest.raises(ValueError):
        mask_from_ids(torch.tensor([[6]]))
