import math

import pytest
import torch

from tilesparse.learning.relax import (LinearSchedule, binary_concrete, expand_tiles, expected_tile_density,
                                       gumbel_noise, gumbel_softmax, logistic_noise, mix_masks, soft_24_mask,
                                       tile_index)
from tilesparse.masks.nm import PATTERNS
from tilesparse.masks.tiles import TileGrid


def test_linear_schedule_endpoints_and_middle():
    s = LinearSchedule(4.0, 0.05)
    assert s.at(0, 101) == 4.0
    assert s.at(100, 101) == pytest.approx(0.05)
    assert s.at(50, 101) == pytest.approx((4.0 + 0.05) / 2)
    assert s.at(500, 101) == pytest.approx(0.05)  # clamped
    assert LinearSchedule(1.0, 2.0).at(0, 1) == 2.0  # a single step uses the end value


def test_binary_concrete_noise_free_and_probability():
    p = torch.tensor([-1.0, 0.0, 0.5])
    assert torch.allclose(binary_concrete(p, 2.0, 0.5), torch.sigmoid(2.0 * p / 0.5))
    torch.manual_seed(0)
    n = 20000
    logits = torch.full((n,), 0.3)
    t = binary_concrete(logits, 2.0, 0.1, noise=logistic_noise((n,)))
    # P(T > 0.5) = sigmoid(k * p) for the binary concrete distribution
    assert (t > 0.5).float().mean().item() == pytest.approx(torch.sigmoid(torch.tensor(0.6)).item(), abs=0.015)


def test_binary_concrete_hard_is_straight_through():
    p = torch.tensor([-0.2, 0.1, 0.7], requires_grad=True)
    noise = torch.tensor([0.3, -0.1, 0.0])
    hard = binary_concrete(p, 3.0, 0.7, noise=noise, hard=True)
    assert torch.allclose(hard.detach(), hard.detach().round(), atol=1e-6)
    (hard * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    g_hard = p.grad.clone()
    p.grad = None
    soft = binary_concrete(p, 3.0, 0.7, noise=noise)
    (soft * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(g_hard, p.grad)
    assert torch.allclose(hard.detach(), (soft.detach() > 0.5).float(), atol=1e-6)


def test_gumbel_softmax_sums_to_one_and_hard_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 6)
    y = gumbel_softmax(logits, 10.0, 2.0, noise=gumbel_noise(logits.shape))
    assert torch.allclose(y.sum(-1), torch.ones(5, 7))
    h = gumbel_softmax(logits, 10.0, 2.0, noise=gumbel_noise(logits.shape), hard=True)
    hd = h.detach()
    one_hot = torch.zeros_like(hd).scatter_(-1, hd.argmax(-1, keepdim=True), 1.0)
    assert torch.allclose(hd, one_hot, atol=1e-6)  # straight-through: one-hot up to rounding


def test_gumbel_argmax_frequency_follows_softmax_of_scaled_logits():
    torch.manual_seed(1)
    n = 30000
    logits = torch.tensor([0.02, 0.0, -0.01, 0.0, 0.01, -0.02])
    scale = 50.0
    y = gumbel_softmax(logits.expand(n, 6), scale, 0.5, noise=gumbel_noise((n, 6)))
    freq = torch.bincount(y.argmax(-1), minlength=6).float() / n
    assert torch.allclose(freq, torch.softmax(scale * logits, -1), atol=0.015)


def test_soft_24_mask_reproduces_candidates_and_keeps_half():
    one_hot = torch.eye(6).reshape(1, 6, 6)  # one group per candidate
    m = soft_24_mask(one_hot)
    assert torch.equal(m.reshape(6, 4).bool(), PATTERNS)
    probs = torch.softmax(torch.randn(3, 8, 6), -1)
    sm = soft_24_mask(probs)
    assert sm.shape == (3, 32)
    assert torch.allclose(sm.reshape(3, 8, 4).sum(-1), torch.full((3, 8), 2.0))
    with pytest.raises(ValueError):
        soft_24_mask(torch.rand(2, 5))


def test_expand_tiles_matches_grid_and_reduces_gradient_per_tile():
    grid = TileGrid(10, 12, 4, 8)  # partial tiles in both directions
    per = torch.randn(grid.shape, requires_grad=True)
    rows, cols = tile_index(grid)
    full = expand_tiles(per, rows, cols)
    assert torch.equal(full.detach(), grid.expand(per.detach()))
    full.sum().backward()
    assert torch.equal(per.grad, grid.tile_numel().float())


def test_mix_and_expected_density_count_partial_tiles():
    grid = TileGrid(10, 12, 4, 8)
    t = torch.zeros(grid.shape)
    t[0, 0] = 1.0  # one full 4x8 tile dense
    kept = expected_tile_density(t, grid.tile_numel())
    assert kept.item() == pytest.approx(0.5 * 120 + 0.5 * 32)
    rows, cols = tile_index(grid)
    m24 = PATTERNS[0].repeat(10, 3).float()
    m = mix_masks(expand_tiles(t, rows, cols), m24)
    assert m.sum().item() == pytest.approx(kept.item())


@pytest.mark.parametrize("hard", [False, True])
def test_fused_soft_24_equals_composition_in_value_and_gradient(hard):
    from tilesparse.learning.relax import fused_soft_24

    torch.manual_seed(0)
    p = torch.randn(10, 8, 6, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise(p.shape).double()
    a = soft_24_mask(gumbel_softmax(p, 7.0, 0.7, noise=noise, hard=hard))
    b = fused_soft_24(p.permute(2, 0, 1), 7.0, 0.7, noise=noise.permute(2, 0, 1).contiguous(), hard=hard)
    w = torch.randn_like(a)
    ga, = torch.autograd.grad((a * w).sum(), p)
    gb, = torch.autograd.grad((b * w).sum(), p)
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(ga, gb, atol=1e-12)
    assert ga.abs().sum() > 0


@pytest.mark.parametrize("grid", [TileGrid(10, 12, 4, 8), TileGrid(8, 16, 4, 8)])
def test_fused_tile_and_joint_weights_equal_composition(grid):
    from tilesparse.learning.relax import joint_masked_weight, tile_scaled_weight

    torch.manual_seed(0)
    w_ = torch.randn(grid.out_features, grid.in_features, dtype=torch.float64)
    keep = torch.rand(w_.shape) > 0.5
    t = torch.rand(grid.shape, dtype=torch.float64, requires_grad=True)
    m24 = torch.rand(w_.shape, dtype=torch.float64, requires_grad=True)
    rows, cols = tile_index(grid)
    g = torch.randn_like(w_)
    a = w_ * mix_masks(expand_tiles(t, rows, cols), keep.double())
    b = tile_scaled_weight(w_, keep, t, grid)
    assert torch.allclose(a, b)
    assert torch.allclose(torch.autograd.grad((a * g).sum(), t)[0], torch.autograd.grad((b * g).sum(), t)[0])
    a = w_ * mix_masks(expand_tiles(t, rows, cols), m24)
    b = joint_masked_weight(w_, m24, t, grid)
    ga = torch.autograd.grad((a * g).sum(), (t, m24))
    gb = torch.autograd.grad((b * g).sum(), (t, m24))
    assert torch.allclose(a, b) and all(torch.allclose(x, y) for x, y in zip(ga, gb))
