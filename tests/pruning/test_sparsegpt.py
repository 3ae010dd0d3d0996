"""SparseGPT's OBS math on single matrices: exactness, patterns, numerical robustness."""

from __future__ import annotations

import warnings

import pytest
import torch

from tilesparse.masks import DENSE, SPARSE, ZERO, TileGrid, classify_tiles, is_2to4, topk_mask
from tilesparse.pruning import SparseGPTWarning, inverse_hessian_cholesky, select_unstructured, sparsegpt_prune


def _data(out=16, inp=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    scale = torch.exp(torch.randn(inp, generator=g))  # features of very different size, like LLM activations
    x = (torch.randn(tokens, inp, generator=g) @ mix) * scale  # correlated features
    w = torch.randn(out, inp, generator=g)
    return w, x, (x.T @ x).double()


def _out_err(w, wp, x):
    return float(((x @ (w - wp).T) ** 2).sum())


def test_obs_update_matches_closed_form():
    """Pruning one weight: the update is the exact minimiser of (w - w')^T H (w - w') with w'_0 = 0."""
    w, _, H = _data(out=3, inp=8)
    damp = 0.01
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[:, 0] = False
    res = sparsegpt_prune(w, H, pattern="fixed", mask=keep, damp=damp, blocksize=4)
    Hd = H + damp * float(torch.diagonal(H).mean()) * torch.eye(8, dtype=torch.float64)
    r = torch.arange(1, 8)
    expected = w.double()[:, r] + (torch.linalg.solve(Hd[r][:, r], Hd[r][:, :1]) @ w.double()[:, :1].T).T
    assert torch.equal(res.keep, keep)
    assert (res.weight[:, 0] == 0).all()
    assert torch.allclose(res.weight[:, 1:].double(), expected, atol=1e-4)


def test_identity_hessian_is_magnitude_without_update():
    w, _, _ = _data()
    H = torch.eye(w.shape[1], dtype=torch.float64) * 3.0
    res = sparsegpt_prune(w, H, pattern="2:4")
    assert torch.equal(res.keep, topk_mask(w.abs()))
    assert torch.allclose(res.weight, w * res.keep)


@pytest.mark.parametrize("blocksize", [8, 128])
def test_patterns_and_reconstruction_beats_selection_only(blocksize):
    w, x, H = _data()
    r24 = sparsegpt_prune(w, H, pattern="2:4", blocksize=blocksize)
    assert is_2to4(r24.keep) and torch.equal(r24.weight != 0, r24.keep | (r24.weight != 0) & r24.keep)
    assert (r24.weight[~r24.keep] == 0).all()
    wanda = w * topk_mask(w.abs() * (x ** 2).sum(0).sqrt())
    mag = w * topk_mask(w.abs())
    e_sg, e_wanda, e_mag = _out_err(w, r24.weight, x), _out_err(w, wanda, x), _out_err(w, mag, x)
    assert e_sg < e_wanda < e_mag  # SparseGPT < Wanda < magnitude on correlated inputs

    ru = sparsegpt_prune(w, H, pattern="unstructured", sparsity=0.5, blocksize=blocksize)
    assert int((~ru.keep).sum()) == w.numel() // 2  # exact count per block
    assert _out_err(w, ru.weight, x) < _out_err(w, w * select_unstructured(w.abs(), 0.5), x)


def test_hybrid_respects_tile_map():
    w, x, H = _data(out=16, inp=32)
    g = TileGrid(16, 32, 8, 8)
    kinds = torch.tensor([[SPARSE, DENSE, ZERO, SPARSE], [DENSE, SPARSE, SPARSE, DENSE]], dtype=torch.int8)
    res = sparsegpt_prune(w, H, pattern="hybrid", kinds=kinds, tile=(8, 8))
    assert torch.equal(classify_tiles(res.keep, g), kinds)
    full = g.expand(kinds)
    dense_w = res.weight[full == DENSE]
    assert (dense_w != 0).all() and not torch.allclose(dense_w, w[full == DENSE])  # kept but compensated
    assert (res.weight[full == ZERO] == 0).all()


def test_singular_hessian_needs_no_fallback():
    w, x, _ = _data(inp=32, tokens=4)  # rank 4 Hessian: positive semi-definite, damping suffices
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparseGPTWarning)
        res = sparsegpt_prune(w, (x.T @ x).double(), pattern="2:4")
    assert torch.isfinite(res.weight).all() and not res.fallback


def test_indefinite_hessian_grows_damping_with_warning():
    w, _, H = _data(inp=16)
    bad = H - 1.5 * float(torch.diagonal(H).mean()) * torch.eye(16, dtype=torch.float64)
    with pytest.warns(SparseGPTWarning, match="damping"):
        res = sparsegpt_prune(w, bad, pattern="2:4")
    assert torch.isfinite(res.weight).all() and res.damp > 0.01 and is_2to4(res.keep)


@pytest.mark.parametrize("kind", ["negative", "nan"])
def test_hopeless_hessian_falls_back_without_nan(kind):
    w, _, H = _data(inp=16)
    if kind == "negative":  # positive diagonal, eigenvalue 1 - 1e5: no damping within reach fixes it
        bad = torch.eye(16, dtype=torch.float64) + 1e5 * (torch.ones(16, 16, dtype=torch.float64)
                                                          - torch.eye(16, dtype=torch.float64)) * -1
    else:
        bad = H.clone()
    if kind == "nan":
        bad[3, 4] = float("nan")
    with pytest.warns(SparseGPTWarning, match="magnitude"):
        res = sparsegpt_prune(w, bad, pattern="2:4")
    assert res.fallback and torch.isfinite(res.weight).all()
    assert torch.equal(res.keep, topk_mask(w.abs()))


def test_dead_inputs_are_pruned_first():
    w, x, _ = _data(inp=16)
    x[:, 5] = 0
    res = sparsegpt_prune(w, (x.T @ x).double(), pattern="2:4")
    assert not res.keep[:, 5].any() and torch.isfinite(res.weight).all()
    zero = sparsegpt_prune(w, torch.zeros(16, 16, dtype=torch.float64), pattern="unstructured", sparsity=0.25)
    assert torch.isfinite(zero.weight).all() and int((~zero.keep).sum()) == w.numel() // 4


def test_inverse_hessian_cholesky_is_an_inverse_factor():
    _, _, H = _data(inp=12)
    U, d = inverse_hessian_cholesky(H, 0.01)
    Hd = H + 0.01 * float(torch.diagonal(H).mean()) * torch.eye(12, dtype=torch.float64)
    assert d == 0.01
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), atol=1e-8)
    assert torch.allclose(U, torch.triu(U))


def test_bad_arguments():
    w, _, H = _data(out=4, inp=8)
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H[:4, :4])
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, pattern="hybrid")
    with pytest.raises(ValueError):
        sparsegpt_prune(w[:, :6], H[:6, :6], pattern="2:4")
    with pytest.raises(ValueError):
        sparsegpt_prune(w, H, blocksize=6)
