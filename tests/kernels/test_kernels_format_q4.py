"""The 4-bit packed hybrid format (version 2): exact unpack, layout, bytes, bad input; ``HybridLinearQ4``."""

from __future__ import annotations

import pytest
import torch

from tilesparse.kernels.format import pack_from_kinds
from tilesparse.kernels.format_q4 import (
    CODE_ALIGN,
    PackedHybridQ4,
    pack_q4,
    q4_bytes,
    unpack_q4,
)
from tilesparse.kernels.linear_q4 import HybridLinearQ4
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, ZERO
from tilesparse.quant import quantize_rtn


def _case(out, inn, tile, seed=0, kinds=None):
    """A weight, a random tile map (every kind) and the keep-mask it implies."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inn, generator=g)
    R, C = -(-out // tile[0]), -(-inn // tile[1])
    if kinds is None:
        kinds = torch.tensor([SPARSE, DENSE, ZERO], dtype=torch.int8)[torch.randint(0, 3, (R, C), generator=g)]
    m24 = topk_mask(W.abs())
    keep = torch.zeros(out, inn, dtype=torch.bool)
    for r in range(R):
        for c in range(C):
            sl = (slice(r * tile[0], (r + 1) * tile[0]), slice(c * tile[1], (c + 1) * tile[1]))
            k = int(kinds[r, c])
            keep[sl] = True if k == DENSE else (m24[sl] if k == SPARSE else False)
    return W, kinds, m24, keep


@pytest.mark.parametrize("out,inn,tile,group,symmetric", [
    (40, 72, (16, 16), 20, False),  # partial tiles in both directions, groups across tile edges, partial last group
    (32, 64, (16, 32), 64, True),
    (24, 48, (8, 16), 7, True),  # odd group size
    (16, 40, (16, 16), 128, False),  # one group wider than the layer
])
def test_unpack_is_the_dequantized_masked_weight(out, inn, tile, group, symmetric):
    W, kinds, m24, keep = _case(out, inn, tile)
    q = quantize_rtn(W, keep, group_size=group, symmetric=symmetric)
    p = pack_q4(q.quantized, kinds, m24, tile)
    U = unpack_q4(p)
    assert U.dtype == torch.float32
    assert torch.equal(U, q.weight * keep)
    assert torch.equal(U[~keep], torch.zeros_like(U[~keep]))


def test_layout_metadata_and_alignment():
    W, kinds, m24, keep = _case(40, 72, (16, 16), seed=3)
    q = quantize_rtn(W, keep, group_size=32)
    p = pack_q4(q.quantized, kinds, m24, (16, 16))
    v1 = pack_from_kinds(W, kinds, m24, (16, 16))
    assert torch.equal(p.sp_meta, v1.sp_meta) and torch.equal(p.tile_kinds, v1.tile_kinds)
    assert torch.equal(p.sp_cols, v1.sp_cols) and torch.equal(p.dn_cols, v1.dn_cols)
    assert (p.q4_info[:, [1, 3]] % CODE_ALIGN == 0).all()
    assert p.scales.dtype == torch.bfloat16 and p.zeros.dtype == torch.uint8
    assert p.scales.shape == (40, 3)


def test_bytes_against_bf16_and_the_ideal_count():
    out, inn, tile = 256, 512, (128, 128)
    kinds = torch.tensor([[SPARSE, DENSE, SPARSE, SPARSE], [DENSE, SPARSE, SPARSE, DENSE]], dtype=torch.int8)
    W, kinds, m24, keep = _case(out, inn, tile, kinds=kinds)
    q = quantize_rtn(W, keep, group_size=128)
    p = pack_q4(q.quantized, kinds, m24, tile)
    stored = p.nbytes(include_derived=False)
    ideal = q4_bytes(out, inn, p.sparse_fraction(), 128)
    assert p.sparse_fraction() == 5 / 8
    assert ideal <= stored <= ideal + 256  # tile map and column lists only
    assert stored < 0.25 * out * inn * 2  # under a quarter of the bf16 weight


def test_bad_input():
    W, kinds, m24, keep = _case(16, 32, (16, 16), kinds=torch.tensor([[SPARSE, DENSE]], dtype=torch.int8))
    q8 = quantize_rtn(W, keep, bits=8, group_size=16)
    with pytest.raises(ValueError, match="4-bit codes"):
        pack_q4(q8.quantized, kinds, m24, (16, 16))
    q = quantize_rtn(W, keep, group_size=16)
    bad = torch.ones(16, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="2:4"):
        pack_q4(q.quantized, kinds, bad, (16, 16))
    p = pack_q4(q.quantized, kinds, m24, (16, 16))
    with pytest.raises(ValueError, match="dn_codes holds"):
        PackedHybridQ4(16, 32, 16, 16, 16, **{**p.stored_tensors(), "dn_codes": p.dn_codes[:-1]})
    with pytest.raises(ValueError, match="group size"):
        PackedHybridQ4(16, 32, 16, 16, 0, **p.stored_tensors())
    with pytest.raises(ValueError, match="bfloat16"):
        PackedHybridQ4(16, 32, 16, 16, 16, **{**p.stored_tensors(), "scales": p.scales.float()})


def _layer(bias=True, seed=1):
    W, kinds, m24, keep = _case(48, 80, (16, 16), seed=seed)
    q = quantize_rtn(W, keep, group_size=32, symmetric=False)
    lin = torch.nn.Linear(80, 48, bias=bias)
    return HybridLinearQ4.from_linear(lin, q.quantized, kinds, m24, (16, 16)), q.weight * keep, lin.bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_forward_is_linear_on_the_dequantized_weight(dtype):
    layer, Wq, bias = _layer()
    layer = layer.to(dtype)
    assert layer.packed_scales.dtype == torch.bfloat16  # a dtype cast leaves the scales alone
    x = torch.randn(3, 5, 80).to(dtype)
    ref = torch.nn.functional.linear(x, Wq.to(dtype), bias.detach().to(dtype))
    assert torch.equal(layer(x), ref)
    assert torch.equal(layer.weight, Wq)
    with pytest.raises(ValueError, match="in_features=80"):
        layer(torch.randn(2, 79).to(dtype))


def test_module_compiles_without_graph_breaks():
    layer, _, _ = _layer(bias=False)
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = torch.randn(4, 80)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
