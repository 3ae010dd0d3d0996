"""GPTQ with a fixed mask: the same grid as round-to-nearest, less output error on correlated inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import SPARSE, TileGrid, hybrid_mask
from tilesparse.pruning import SparseGPTWarning
from tilesparse.quant import quantize_gptq, quantize_rtn


def _problem(out=48, inp=200, seed=0):
    """A weight, a hybrid keep-mask (dense and 2:4 tiles of 16x32) and correlated inputs: a few strong
    shared directions plus noise, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(1024, 8, generator=g) @ torch.randn(8, inp, generator=g) + 0.3 * torch.randn(1024, inp, generator=g)
    grid = TileGrid(out, inp, 16, 40)
    kinds = (torch.rand(grid.shape, generator=g) < 0.5).to(torch.int8)  # SPARSE or DENSE
    keep = hybrid_mask(kinds, topk_mask(w.abs()), grid)
    assert bool((kinds == SPARSE).any()) and not bool(keep.all())
    return w * keep, keep, x, (x.T @ x).double()


def _out_err(x, w, q):
    return float((x @ w.T - x @ q.T).norm())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [128, 32])
def test_gptq_has_a_clearly_lower_layer_output_error_than_rtn(symmetric, group_size):
    w, keep, x, h = _problem()
    rtn = quantize_rtn(w, keep, group_size=group_size, symmetric=symmetric)
    gptq = quantize_gptq(w, h, keep, group_size=group_size, symmetric=symmetric)
    assert not gptq.fallback and gptq.damp == 0.01
    assert _out_err(x, w, gptq.weight) < 0.5 * _out_err(x, w, rtn.weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_same_grid_as_rtn_pruned_weights_stay_zero(symmetric):
    w, keep, x, h = _problem(seed=1)
    gs = 64  # partial last group: 200 = 3 x 64 + 8
    res = quantize_gptq(w, h, keep, bits=4, group_size=gs, symmetric=symmetric)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 15
    assert res.scales.shape == res.zeros.shape == (w.shape[0], 4) and res.scales.dtype == torch.bfloat16
    assert torch.equal(res.weight, res.quantized.dequantize())
    scale = res.scales.float().repeat_interleave(gs, 1)[:, :200]
    exact = scale.double() * (res.codes.double() - res.zeros.double().repeat_interleave(gs, 1)[:, :200])
    assert torch.equal(res.weight.double(), exact)
    assert bool((res.weight[~keep] == 0).all())
    # an unmasked input is pruned by the same mask (its pruning error compensated too)
    dense_in = quantize_gptq(w + (~keep) * 0.5, h, keep, group_size=gs, symmetric=symmetric)
    assert bool((dense_in.weight[~keep] == 0).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_on_gptq_keeps_the_grid(symmetric):
    w, keep, x, h = _problem(seed=2)
    kw = dict(bits=3, group_size=64, symmetric=symmetric)
    mm = quantize_gptq(w, h, keep, **kw)
    mse = quantize_gptq(w, h, keep, observer="mse", **kw)
    assert torch.equal(mse.weight, mse.quantized.dequantize()) and bool((mse.weight[~keep] == 0).all())
    assert not torch.equal(mse.scales, mm.scales)  # the search chose other ranges for some groups
    assert _out_err(x, w * keep, mse.weight) < 1.2 * _out_err(x, w * keep, mm.weight)


def test_lazy_blocks_are_exact_even_when_groups_straddle_them():
    """Block size changes only the order of float operations: the codes are those of the column-by-column
    algorithm (block size 1), whose group ranges come from fully updated weights."""
    w, keep, _, h = _problem(inp=200, seed=2)
    ref = quantize_gptq(w, h, keep, group_size=48, blocksize=1)
    for bs in (16, 100, 128, 1000):
        res = quantize_gptq(w, h, keep, group_size=48, blocksize=bs)
        assert torch.equal(res.codes, ref.codes), bs
        assert torch.equal(res.scales, ref.scales) and torch.equal(res.zeros, ref.zeros)


def test_without_input_correlation_gptq_is_rtn():
    w, keep, _, _ = _problem(seed=3)
    h = torch.eye(w.shape[1], dtype=torch.float64) * 5.0
    a = quantize_gptq(w, h, keep, group_size=32, symmetric=False)
    b = quantize_rtn(w, keep, group_size=32, symmetric=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_keeps_the_grid_and_beats_rtn(symmetric):
    w, keep, x, h = _problem(seed=5)
    x = x * torch.linspace(0.2, 3.0, x.shape[1])  # inputs of unequal energy: the visit order matters
    h = (x.T @ x).double()
    kw = dict(group_size=64, symmetric=symmetric)
    res = quantize_gptq(w, h, keep, act_order=True, **kw)
    assert not res.fallback
    assert torch.equal(res.weight, res.quantized.dequantize()) and bool((res.weight[~keep] == 0).all())
    # static groups: the scales are round-to-nearest's, taken from the weight as given
    rtn = quantize_rtn(w, keep, **kw)
    assert torch.equal(res.scales, rtn.scales) and torch.equal(res.zeros, rtn.zeros)
    assert _out_err(x, w, res.weight) < 0.5 * _out_err(x, w, rtn.weight)


def test_act_order_without_input_correlation_is_rtn():
    w, keep, _, _ = _problem(seed=3)
    h = torch.diag(torch.linspace(1.0, 9.0, w.shape[1], dtype=torch.float64))  # a visit order other than 0, 1, ...
    a = quantize_gptq(w, h, keep, group_size=32, symmetric=False, act_order=True)
    b = quantize_rtn(w, keep, group_size=32, symmetric=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("act_order", [False, True])
def test_an_unusable_hessian_falls_back_to_rtn_with_a_warning(act_order):
    w, keep, _, h = _problem(seed=4)
    h = h.clone()
    h[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = quantize_gptq(w, h, keep, act_order=act_order)
    assert res.fallback and res.damp == float("inf")
    assert any(issubclass(c.category, SparseGPTWarning) for c in caught)
    assert torch.equal(res.weight, quantize_rtn(w, keep).weight)


def test_bad_arguments():
    w, keep, _, h = _problem()
    with pytest.raises(ValueError, match="Hessian shape"):
        quantize_gptq(w, h[:10, :10], keep)
    with pytest.raises(ValueError, match="group size must be a positive integer"):
        quantize_gptq(w, h, keep, group_size=0)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_gptq(w, h, keep, bits=16)
    with pytest.raises(ValueError, match="blocksize must be positive"):
        quantize_gptq(w, h, keep, blocksize=0)
