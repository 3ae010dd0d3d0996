"""Packed format: exact round trips, byte counts, layout facts, bad input."""

from __future__ import annotations

import pytest
import torch

from kernels_testutil import interp, make_layer  # noqa: F401 (fixtures)

from tilesparse.kernels.format import (PackedHybrid, bytes_bound_speedup, hybrid_bytes, pack, pack_from_kinds,
                                       unpack)
from tilesparse.masks.nm import NotTwoFourError, topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, ZERO, TileGrid


@pytest.mark.parametrize("N,K,tile,fs,fz", [
    (64, 64, (16, 16), 0.5, 0.2),
    (100, 200, (32, 64), 0.5, 0.2),   # partial edge tiles both ways
    (130, 72, (64, 64), 0.4, 0.3),
    (256, 256, (128, 128), 0.5, 0.0),
    (300, 576, (128, 128), 0.6, 0.1),  # SmolLM-like partial column tile (576 = 4.5 x 128)
    (96, 128, (32, 32), 1.0, 0.0),     # all 2:4
    (96, 128, (32, 32), 0.0, 0.0),     # all dense
    (96, 128, (32, 32), 0.0, 1.0),     # all zero
    (40, 52, (16, 32), 0.5, 0.25),     # in = 52: edge tile 20 wide (odd number of groups)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_exact(make_layer, N, K, tile, fs, fz, dtype):
    W, mask, p = make_layer(N, K, tile, fs, fz, dtype, seed=N + K)
    assert torch.equal(unpack(p), W * mask)
    assert p.dtype == dtype
    counts = p.kind_counts()
    assert sum(counts.values()) == TileGrid(N, K, *tile).n_rows * TileGrid(N, K, *tile).n_cols
    # the kinds read off the mask are the ones asked for
    assert counts["zero"] == round(fz * sum(counts.values())) or fz == 0.0


def test_pack_from_kinds_matches_pack(make_layer):
    W, mask, p = make_layer(100, 200, (32, 64), 0.5, 0.2)
    p2 = pack_from_kinds(W, p.tile_kinds, mask, (32, 64))
    for name in PackedHybrid.STORED:
        assert torch.equal(getattr(p, name), getattr(p2, name)), name


def test_all_dense_is_plain_weight():
    W = torch.randn(256, 384).bfloat16()
    p = pack(W, torch.ones_like(W, dtype=torch.bool))
    assert p.is_plain_dense()
    assert torch.equal(p.dense_view(), W)
    assert p.dense_view().data_ptr() == p.dn_vals.data_ptr()


def test_all_24_layout_is_compressed_matrix():
    W = torch.randn(256, 512).bfloat16()
    m = topk_mask(torch.rand(256, 512))
    p = pack(W, m)
    assert p.sp_vals.numel() == 256 * 256 and p.dn_vals.numel() == 0
    assert torch.equal(p.sp_vals.view(256, 256), W[m].view(256, 256))
    # metadata: first group of row 0 holds the two kept positions, p0 | p1 << 2
    pos = m[0, :4].nonzero().flatten().tolist()
    assert int(p.sp_meta[0]) & 15 == pos[0] | (pos[1] << 2)


def test_bytes():
    N = K = 1024
    W = torch.randn(N, K).bfloat16()
    m = topk_mask(torch.rand(N, K))
    p = pack(W, m)
    ratio = p.nbytes(include_derived=False) / p.dense_nbytes()
    assert abs(ratio - 0.5625) < 1e-3
    assert abs(hybrid_bytes(N, K, 1.0) / (2 * N * K) - 0.5625) < 1e-12
    assert abs(bytes_bound_speedup(1.0) - 1 / 0.5625) < 1e-12
    assert bytes_bound_speedup(0.0) == 1.0


def test_alignment_of_blocks(make_layer):
    _, _, p = make_layer(300, 576, (128, 128), 0.5, 0.1)
    info = p.row_info
    assert bool((info[:, 1] % 8 == 0).all()) and bool((info[:, 2] % 8 == 0).all())
    assert bool((info[:, 3] % 16 == 0).all()) and bool((info[:, 4] % 16 == 0).all())
    assert bool((info[:, 6] % 8 == 0).all()) and bool((info[:, 7] % 8 == 0).all())


def test_clone_and_to(make_layer):
    W, mask, p = make_layer(64, 64, (32, 32), 0.5, 0.2, torch.float32)
    q = p.clone()
    assert q.sp_vals.data_ptr() != p.sp_vals.data_ptr()
    assert torch.equal(unpack(q), W * mask)
    h = p.to(dtype=torch.float16)
    assert h.dtype == torch.float16 and h.sp_meta.dtype == torch.uint8
    assert torch.equal(unpack(h), (W * mask).half())


def test_bad_24_tile_is_named():
    W = torch.randn(64, 64)
    kinds = torch.full((2, 2), SPARSE, dtype=torch.int8)
    m24 = topk_mask(torch.rand(64, 64))
    m24[40, 32:36] = True  # 4 of 4 kept in tile (1, 1)
    with pytest.raises(NotTwoFourError, match=r"tile \(1, 1\)"):
        pack_from_kinds(W, kinds, m24, (32, 32))


def test_unstructured_mask_rejected():
    W = torch.randn(64, 64)
    m = torch.rand(64, 64) > 0.5
    with pytest.raises(ValueError, match="neither dense"):
        pack(W, m, (32, 32))


def test_bad_inputs():
    W = torch.randn(64, 64)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.randn(4, 4, 4), torch.ones(4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        pack(W, torch.ones(64, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        pack(W.to(torch.int32), torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="tile map has shape"):
        pack_from_kinds(W, torch.zeros(3, 3, dtype=torch.int8), None, (32, 32))
    with pytest.raises(ValueError, match="unknown kind"):
        pack_from_kinds(W, torch.full((2, 2), 7, dtype=torch.int8), None, (32, 32))
    with pytest.raises(ValueError, match="2:4 mask is needed"):
        pack_from_kinds(W, torch.full((2, 2), SPARSE, dtype=torch.int8), None, (32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_from_kinds(torch.randn(8, 18), torch.tensor([[SPARSE]], dtype=torch.int8),
                        torch.ones(8, 18, dtype=torch.bool), (8, 32))
    # dense + zero layers need no 2:4 mask
    p = pack_from_kinds(W, torch.tensor([[DENSE, ZERO], [ZERO, DENSE]], dtype=torch.int8), None, (32, 32))
    ref = W.clone()
    ref[:32, 32:] = 0
    ref[32:, :32] = 0
    assert torch.equal(unpack(p), ref)


def test_corrupt_sizes_rejected(make_layer):
    _, _, p = make_layer(64, 64, (32, 32), 0.5)
    kw = {n: getattr(p, n) for n in PackedHybrid.STORED}
    kw["sp_vals"] = kw["sp_vals"][:-8]
    with pytest.raises(ValueError, match="sp_vals holds"):
        PackedHybrid(out_features=64, in_features=64, tile_rows=32, tile_cols=32, **kw)
