"""Fused Triton mask kernels (learning/fused_triton.py) vs the torch reference (learning/relax.py), on the CPU
through the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at small shapes.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from tilesparse.errors import TilesparseError
from tilesparse.learning.relax import fused_soft_24, joint_masked_weight, tile_scaled_weight
from tilesparse.masks.nm import mask_from_ids
from tilesparse.masks.tiles import TileGrid

# out, in, tile: partial edge tiles both ways; tiles of one row-block / several column blocks
SHAPES = [(40, 72, (16, 32)), (33, 100, (8, 64))]
K, TAU = 3.0, 0.7


def _interpreter_ready() -> bool:
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET") == "1"
    import triton.language as tl

    return type(tl.cdiv).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def ft():
    pytest.importorskip("triton")
    if not _interpreter_ready():
        pytest.skip("interpreted kernels: a GPU machine runs the kernels themselves (TRITON_INTERPRET is not 1)")
    from tilesparse.learning import fused_triton

    if not fused_triton.interpreted():
        fused_triton = importlib.reload(fused_triton)
    assert fused_triton.interpreted()
    return fused_triton


# -- helpers ------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _case(out, inn, tile, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = TileGrid(out, inn, *tile)
    w = torch.randn(out, inn, generator=g).to(dtype)
    logits = torch.randn(6, out, inn // 4, generator=g)
    tiles = torch.rand(grid.shape, generator=g)
    ids = torch.randint(0, 6, (out, inn // 4), generator=g).to(torch.uint8)
    gout = torch.randn(out, inn, generator=g).to(dtype)
    return grid, w, logits, tiles, ids, gout


def _run_fused(ft, mode, grid, w, logits, tiles, ids, gout, *, hard=False, noise=False, seed=None, sq_w=0.1):
    lg = logits.clone().requires_grad_() if mode != "tile" else None
    t = tiles.clone().requires_grad_() if mode != "maskllm" else None
    wm, sq = ft.fused_masked_weight(w, grid, logits=lg, tiles=t, ids=ids if mode == "tile" else None, scale=K,
                                    tau=TAU, hard=hard, noise=noise, seed=seed, record_sq=True)
    ((wm.float() * gout.float()).sum() + sq_w * sq).backward()
    return wm.detach(), sq.detach(), (None if lg is None else lg.grad), (None if t is None else t.grad)


def _run_ref(mode, grid, w, logits, tiles, ids, gout, *, hard=False, noise=None, sq_w=0.1):
    lg = logits.clone().requires_grad_() if mode != "tile" else None
    t = tiles.clone().requires_grad_() if mode != "maskllm" else None
    if mode == "tile":
        wm = tile_scaled_weight(w, mask_from_ids(ids), t, grid)
    else:
        m24 = fused_soft_24(lg, K, TAU, noise=noise, hard=hard)
        wm = w * m24.to(w.dtype) if mode == "maskllm" else joint_masked_weight(w, m24, t, grid)
    sq = wm.float().pow(2).sum()
    ((wm.float() * gout.float()).sum() + sq_w * sq).backward()
    return wm.detach(), sq.detach(), (None if lg is None else lg.grad), (None if t is None else t.grad)


def _compare(got, ref, dtype, what=""):
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    wm, sq, dl, dt = got
    rwm, rsq, rdl, rdt = ref
    assert wm.dtype == dtype and wm.shape == rwm.shape
    assert _rel(wm, rwm) < tol, what + " value"
    assert abs(float(sq) - float(rsq)) <= tol * float(rsq), what + " sum of squares"
    if rdl is not None:
        assert dl is not None and dl.dtype == torch.float32 and _rel(dl, rdl) < tol, what + " d logits"
    if rdt is not None:
        assert dt is not None and dt.dtype == torch.float32 and _rel(dt, rdt) < tol, what + " d tiles"


# -- values and gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-t{s[2][0]}x{s[2][1]}")
@pytest.mark.parametrize("mode,hard", [("joint", False), ("joint", True), ("maskllm", False), ("maskllm", True),
                                       ("tile", False)])
def test_noise_free_matches_torch_reference(ft, mode, hard, shape, dtype):
    out, inn, tile = shape
    grid, w, logits, tiles, ids, gout = _case(out, inn, tile, dtype, seed=out * inn)
    got = _run_fused(ft, mode, grid, w, logits, tiles, ids, gout, hard=hard, noise=False)
    ref = _run_ref(mode, grid, w, logits, tiles, ids, gout, hard=hard, noise=None)
    _compare(got, ref, dtype, f"{mode} hard={hard}")
    if hard and mode != "tile":  # forward is an exact 2:4 selection of W (times the tile mix)
        m = got[0].float() / w.float().where(w != 0, torch.ones_like(w.float()))
        if mode == "maskllm":
            assert torch.all((m == 0) | (m == 1)) and torch.all((m != 0).reshape(out, -1, 4).sum(-1) == 2)


@pytest.mark.parametrize("mode", ["joint", "tile", "maskllm"])
def test_program_blocks_smaller_than_tiles(ft, mode, monkeypatch):
    # several programs per tile both ways (their partial tile gradients are summed per tile), fully masked
    # programs past the partial last tile row
    monkeypatch.setenv("TILESPARSE_FUSED_BLOCKS", "8,8,4")
    assert ft.blocks() == (8, 8, 4)
    grid, w, logits, tiles, ids, gout = _case(40, 136, (16, 64), torch.float32, seed=11)
    got = _run_fused(ft, mode, grid, w, logits, tiles, ids, gout, noise=False)
    ref = _run_ref(mode, grid, w, logits, tiles, ids, gout, noise=None)
    _compare(got, ref, torch.float32, f"{mode} small blocks")
    monkeypatch.setenv("TILESPARSE_FUSED_BLOCKS", "8,6,4")
    with pytest.raises(TilesparseError, match="powers of two"):
        ft.blocks()


@pytest.mark.parametrize("mode,hard", [("joint", False), ("joint", True), ("maskllm", False)])
def test_noise_is_reproducible_and_shared_by_forward_and_backward(ft, mode, hard):
    out, inn, tile = SHAPES[0]
    grid, w, logits, tiles, ids, gout = _case(out, inn, tile, torch.float32, seed=7)
    a = _run_fused(ft, mode, grid, w, logits, tiles, ids, gout, hard=hard, noise=True, seed=1234)
    b = _run_fused(ft, mode, grid, w, logits, tiles, ids, gout, hard=hard, noise=True, seed=1234)
    for x, y in zip(a, b):  # bit-identical twice
        assert x is None or torch.equal(x, y)
    c = _run_fused(ft, mode, grid, w, logits, tiles, ids, gout, hard=hard, noise=True, seed=1235)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])
    # the torch reference with the kernel's noise reproduces value and gradients: forward and backward
    # drew the same noise (a backward with other noise would fail the gradient comparison, see c)
    noise = ft.gumbel_noise_from_seed(1234, logits.shape)
    ref = _run_ref(mode, grid, w, logits, tiles, ids, gout, hard=hard, noise=noise)
    _compare(a, ref, torch.float32, f"{mode} noisy")
    assert _rel(c[2], ref[2]) > 1e-2
    noise_free = _run_ref(mode, grid, w, logits, tiles, ids, gout, hard=hard, noise=None)
    assert _rel(a[0], noise_free[0]) > 1e-3  # the noise did something


def test_in_kernel_noise_is_standard_gumbel(ft):
    g = ft.gumbel_noise_from_seed(99, (6, 64, 64))
    assert torch.equal(g, ft.gumbel_noise_from_seed(99, (6, 64, 64)))
    assert abs(g.mean().item() - 0.5772) < 0.03 and abs(g.std().item() - 1.2825) < 0.03
    assert not torch.equal(g[0], g[1])  # candidates draw independent noise
    assert g.unique().numel() > 0.99 * g.numel()


def test_seed_comes_from_torch_rng(ft):
    out, inn, tile = SHAPES[0]
    grid, w, logits, tiles, *_ = _case(out, inn, tile, torch.float32)
    outs = []
    for reseed in (True, True, False):
        if reseed:
            torch.manual_seed(5)
        outs.append(ft.fused_masked_weight(w, grid, logits=logits, tiles=tiles, scale=K, tau=TAU)[0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_transposed_weight_view_and_input_checks(ft):
    out, inn, tile = SHAPES[0]
    grid, w, logits, tiles, ids, gout = _case(out, inn, tile, torch.float32)
    wt = w.t().contiguous().t()  # GPT-2 Conv1D: a transposed view
    assert not wt.is_contiguous()
    a = _run_fused(ft, "joint", grid, wt, logits, tiles, ids, gout)
    ref = _run_ref("joint", grid, w, logits, tiles, ids, gout)
    _compare(a, ref, torch.float32, "transposed")
    with pytest.raises(ValueError):
        ft.fused_masked_weight(w, grid, logits=logits, ids=ids, tiles=tiles)
    with pytest.raises(ValueError):
        ft.fused_masked_weight(w, grid, logits=logits[:, :-1])


# -- masked model integration --------------------------------------------------------------------------
def _model_step(mode, fused, *, stochastic, ckpt=False, hard=False, dtype=torch.float32, seed=3, layers=2):
    from conftest import make_tiny_model
    from tilesparse.learning.masked import MaskedModel
    from tilesparse.learning.priors import magnitude_24
    from tilesparse.masks.nm import ids_from_mask
    from tilesparse.models import find_prunable_linears

    model = make_tiny_model("llama", layers=layers).to(dtype)
    ids = ({l.name: ids_from_mask(magnitude_24(l.weight)) for l in find_prunable_linears(model)}
           if mode == "tile" else None)
    mm = MaskedModel(model, mode, tile=(16, 32), ids=ids, fused=fused)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in mm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if ckpt:
        mm.enable_checkpointing()
    mm.set_values(tile_k=25.0, tile_tau=4.0, pattern_k=100.0, pattern_tau=4.0, stochastic=stochastic,
                  record_norms=True, hard_24=hard, hard_tile=hard)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    model.train()
    out = model(input_ids=x, labels=x)
    loss = out.loss.float() + mm.densities("sampled") - 0.01 * mm.masked_norm_sum()
    loss.backward()
    used = [l.use_fused() for l in mm.layers]
    res = (loss.detach(), [p.grad.clone() for p in mm.parameters()], used)
    mm.remove()
    return res


@pytest.mark.parametrize("mode", ["joint", "tile", "maskllm"])
def test_masked_model_fused_equals_torch_path(ft, mode):
    loss_t, grads_t, used_t = _model_step(mode, False, stochastic=False)
    loss_f, grads_f, used_f = _model_step(mode, True, stochastic=False)
    assert not any(used_t) and all(used_f)
    assert abs(loss_f.item() - loss_t.item()) < 1e-5
    for a, b in zip(grads_f, grads_t):
        assert _rel(a, b) < 1e-4


def test_masked_model_fused_hard_bf16_matches_torch_path(ft):
    loss_t, grads_t, _ = _model_step("joint", False, stochastic=False, hard=True, dtype=torch.bfloat16)
    loss_f, grads_f, _ = _model_step("joint", True, stochastic=False, hard=True, dtype=torch.bfloat16)
    assert abs(loss_f.item() - loss_t.item()) < 2e-2
    for a, b in zip(grads_f, grads_t):
        assert _rel(a, b) < 5e-2


def test_masked_model_fused_noise_survives_gradient_checkpointing(ft):
    # (the recomputed forward draws the same seed because checkpointing restores the RNG state)
    a = _model_step("joint", True, stochastic=True, ckpt=False, layers=1)
    b = _model_step("joint", True, stochastic=True, ckpt=True, layers=1)
    assert all(a[2]) and a[0].item() == b[0].item()
    for x, y in zip(a[1], b[1]):
        assert torch.allclose(x, y, atol=1e-6)


def test_switch(monkeypatch):
    from tilesparse.learning.masked import fused_choice

    monkeypatch.delenv("TILESPARSE_FUSED_MASK", raising=False)
    assert fused_choice() is None and fused_choice(True) is True and fused_choice(False) is False
    for v, want in (("0", False), ("off", False), ("1", True), ("on", True), ("auto", None)):
        monkeypatch.setenv("TILESPARSE_FUSED_MASK", v)
        assert fused_choice() is want
    assert fused_choice(False) is False  # the argument wins over the variable
    monkeypatch.setenv("TILESPARSE_FUSED_MASK", "maybe")
    with pytest.raises(TilesparseError, match="TILESPARSE_FUSED_MASK"):
        fused_choice()


def test_auto_keeps_the_torch_path_on_cpu(monkeypatch):
    from conftest import make_tiny_model
    from tilesparse.learning.masked import MaskedModel

    monkeypatch.delenv("TILESPARSE_FUSED_MASK", raising=False)
    mm = MaskedModel(make_tiny_model("llama"), "maskllm", tile=(16, 32))
    assert not any(l.use_fused() for l in mm.layers)
    monkeypatch.setenv("TILESPARSE_FUSED_MASK", "0")
    mm.state.fused = None
    assert not any(l.use_fused() for l in mm.layers)
