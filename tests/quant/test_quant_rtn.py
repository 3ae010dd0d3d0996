"""The quantization grid and round-to-nearest: exact properties on random weights and masks."""

from __future__ import annotations

import pytest
import torch

from tilesparse.masks.nm import topk_mask
from tilesparse.quant import dequantize, group_params, n_groups, quantize_rtn


def _weight(out=24, inp=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.linspace(0.1, 3.0, inp)  # groups of different ranges


def _keep_24(w):
    return topk_mask(w.abs())  # a 2:4 keep-mask (two of every four along in)


def _per_col(t, gs, cols):
    return t.float().repeat_interleave(gs, dim=1)[:, :cols]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_codes_range_exact_dequantization_and_error_bound(bits, symmetric, masked):
    w = _weight()
    keep = _keep_24(w) if masked else None
    gs = 64  # 200 = 3 x 64 + 8: a partial last group
    res = quantize_rtn(w, keep, bits=bits, group_size=gs, symmetric=symmetric)
    out, cols = w.shape
    assert res.codes.dtype == torch.uint8 and res.codes.shape == w.shape
    assert res.scales.dtype == torch.bfloat16 and res.zeros.dtype == torch.bfloat16
    assert res.scales.shape == res.zeros.shape == (out, 4)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 2 ** bits - 1
    assert bool((res.scales > 0).all())
    z = res.zeros.float()
    assert torch.equal(z, z.round()) and bool((z >= 0).all()) and bool((z <= 2 ** bits - 1).all())
    if symmetric:
        assert bool((z == 2 ** (bits - 1)).all())
    # the weight is exactly scale * (code - zero), and float32 holds that product exactly
    exact = _per_col(res.scales, gs, cols).double() * (res.codes.double() - _per_col(res.zeros, gs, cols).double())
    assert torch.equal(res.weight.double(), exact)
    assert torch.equal(res.weight, res.quantized.dequantize())
    kept = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
    err = (w - res.weight).abs()
    assert bool((err[kept] <= _per_col(res.scales, gs, cols)[kept] / 2 * (1 + 1e-6)).all())
    if keep is not None:
        assert bool((res.weight[~keep] == 0).all())
        assert torch.equal(res.codes[~keep].float(), _per_col(res.zeros, gs, cols)[~keep])


def test_scales_are_the_group_range_rounded_up_to_bfloat16():
    w = _weight(seed=1)
    keep = _keep_24(w)
    res = quantize_rtn(w, keep, bits=4, group_size=64, symmetric=True)
    for g in range(4):
        cols = slice(64 * g, 64 * (g + 1))
        absmax = (w[:, cols] * keep[:, cols]).abs().amax(1)
        exact = 2 * absmax / 15
        s = res.scales[:, g].float()
        assert bool((s >= exact).all())
        below = torch.nextafter(res.scales[:, g], torch.zeros_like(res.scales[:, g])).float()
        assert bool((below < exact).all())  # the smallest bfloat16 value that is not below the range
    asym = quantize_rtn(w, keep, bits=4, group_size=64, symmetric=False)
    v = torch.where(keep, w, 0.0)[:, :64]
    assert bool((asym.scales[:, 0].float() >= (v.amax(1).clamp(min=0) - v.amin(1).clamp(max=0)) / 15).all())


def test_group_stats_ignore_the_pruned_weights():
    w = _weight(seed=2)
    keep = _keep_24(w)
    base = quantize_rtn(w, keep, group_size=32, symmetric=False)
    loud = torch.where(keep, w, torch.full_like(w, 1e4))  # huge values where pruned
    other = quantize_rtn(loud, keep, group_size=32, symmetric=False)
    for a, b in ((base.codes, other.codes), (base.scales, other.scales), (base.zeros, other.zeros),
                 (base.weight, other.weight)):
        assert torch.equal(a, b)
    # and the kept weights alone decide: the same as a dense group holding only them, zeros elsewhere
    s, z = group_params(w[:, :32], keep[:, :32], 4, False)
    s0, z0 = group_params(torch.where(keep, w, 0.0)[:, :32], torch.ones(w.shape[0], 32, dtype=torch.bool), 4, False)
    assert torch.equal(s, s0) and torch.equal(z, z0)


@pytest.mark.parametrize("gs", [48, 64, 500])
def test_a_partial_last_group_is_quantized_on_its_own(gs):
    w = _weight(inp=200, seed=3)
    keep = _keep_24(w)
    res = quantize_rtn(w, keep, group_size=gs)
    g = n_groups(200, gs)
    assert res.scales.shape == (w.shape[0], g) and g == -(-200 // gs)
    start = (g - 1) * gs
    tail = quantize_rtn(w[:, start:], keep[:, start:], group_size=gs)
    assert torch.equal(res.codes[:, start:], tail.codes)
    assert torch.equal(res.scales[:, -1:], tail.scales) and torch.equal(res.weight[:, start:], tail.weight)


def test_a_group_with_nothing_kept_is_all_zero():
    w = _weight(inp=64)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[:, :32] = False
    res = quantize_rtn(w, keep, group_size=32, symmetric=False)
    assert bool((res.weight[:, :32] == 0).all()) and bool((res.scales[:, 0] == 1).all())
    assert bool((res.weight[:, 32:] != 0).any())


@pytest.mark.parametrize("kw, msg", [
    ({"group_size": 0}, "group size must be a positive integer"),
    ({"group_size": -128}, "group size must be a positive integer"),
    ({"bits": 5}, "bits must be one of 2, 3, 4, 8"),
    ({"bits": 1}, "bits must be one of 2, 3, 4, 8"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        quantize_rtn(_weight(), **kw)


def test_bad_shapes():
    w = _weight()
    with pytest.raises(ValueError, match="keep-mask of shape"):
        quantize_rtn(w, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not fit"):
        dequantize(torch.zeros(4, 10, dtype=torch.uint8), torch.ones(4, 2), torch.zeros(4, 2), 4)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rtn(torch.full((2, 8), float("nan")))


def _group_error(w, res, keep, gs, norm=2.4):
    err = (w - res.weight).abs().pow(norm) * keep
    out, cols = w.shape
    return torch.nn.functional.pad(err, (0, n_groups(cols, gs) * gs - cols)).reshape(out, -1, gs).sum(-1)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_mse_observer_never_rounds_a_group_worse_than_minmax(bits, symmetric, masked):
    w = _weight(seed=3)
    keep = _keep_24(w) if masked else torch.ones_like(w, dtype=torch.bool)
    kw = dict(bits=bits, group_size=64, symmetric=symmetric)
    mm = quantize_rtn(w, keep, **kw)
    mse = quantize_rtn(w, keep, observer="mse", **kw)
    e_mm, e_mse = _group_error(w, mm, keep, 64), _group_error(w, mse, keep, 64)
    assert bool((e_mse <= e_mm * (1 + 1e-6)).all())
    assert float(e_mse.sum()) < 0.97 * float(e_mm.sum())
    # same grid guarantees as minmax: exact dequantization, pruned weights exactly 0, scales no larger
    assert torch.equal(mse.weight, mse.quantized.dequantize())
    assert bool((mse.weight[~keep] == 0).all())
    assert bool((mse.scales.float() <= mm.scales.float()).all())


def test_mse_observer_with_nothing_kept_and_bad_name():
    w = _weight(inp=64)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[:, :32] = False
    res = quantize_rtn(w, keep, group_size=32, symmetric=False, observer="mse")
    assert bool((res.weight[:, :32] == 0).all()) and bool((res.scales[:, 0] == 1).all())
    with pytest.raises(ValueError, match="observer must be minmax or mse"):
        quantize_rtn(w, observer="max")
