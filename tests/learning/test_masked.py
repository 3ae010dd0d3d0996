import pytest
import torch

from conftest import make_tiny_model
from tilesparse.learning.masked import MaskedLinear, MaskedModel
from tilesparse.learning.priors import magnitude_24, pattern_prior_logits
from tilesparse.masks.nm import ids_from_mask
from tilesparse.masks.tiles import TileGrid
from tilesparse.models import find_prunable_linears

TILE = (16, 16)


def _inputs(n=2, seq=12, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _grids(model):
    return {l.name: TileGrid(l.out_features, l.in_features, *TILE) for l in find_prunable_linears(model)}


def _ids(model):
    return {l.name: ids_from_mask(magnitude_24(l.weight)) for l in find_prunable_linears(model)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_dense_tiles_reproduce_the_dense_model_and_remove_restores(arch):
    model = make_tiny_model(arch)
    x = _inputs()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    tiles = {n: torch.full(g.shape, 10.0) for n, g in _grids(model).items()}
    mm = MaskedModel(model, "joint", tile=TILE, tile_init=tiles)
    assert len(mm.layers) == len(find_prunable_linears(model))
    assert isinstance(model.get_submodule(mm.layers[0].layer_name), MaskedLinear)
    mm.set_values(tile_k=100.0, tile_tau=0.05, pattern_k=1.0, pattern_tau=1.0, stochastic=False)
    with torch.no_grad():
        out = model(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-5)
    mm.remove()
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)


@pytest.mark.parametrize("mode", ["tile", "maskllm"])
def test_sparse_tiles_equal_one_shot_2to4_weights(mode):
    model = make_tiny_model("llama")
    ids = _ids(model)
    x = _inputs()
    if mode == "tile":
        mm = MaskedModel(model, "tile", tile=TILE, ids=ids,
                         tile_init={n: torch.full(g.shape, -10.0) for n, g in _grids(model).items()})
    else:
        pri = {l.name: pattern_prior_logits(magnitude_24(l.weight), std=1.0, strength=3.0)
               for l in find_prunable_linears(model)}
        mm = MaskedModel(model, "maskllm", tile=TILE, pattern_init=pri)
    mm.set_values(tile_k=100.0, tile_tau=0.05, pattern_k=100.0, pattern_tau=0.05, stochastic=False)
    with torch.no_grad():
        out = model(input_ids=x).logits
    mm.remove()
    for l in find_prunable_linears(model):
        l.apply_mask(magnitude_24(l.weight))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-4)


def test_only_logits_get_gradients_and_density_is_numel_weighted():
    model = make_tiny_model("llama")
    mm = MaskedModel(model, "joint", tile=TILE)
    mm.set_values(tile_k=25.0, tile_tau=4.0, pattern_k=100.0, pattern_tau=4.0, record_norms=True)
    out = model(input_ids=_inputs(), labels=_inputs())
    d = mm.densities("sampled")
    loss = out.loss + d + mm.masked_norm_sum()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "logits" not in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mm.parameters())
    # global density from recorded tile values equals the numel-weighted mean of layer densities
    kept = [0.5 * l.grid.numel + 0.5 * float((mm.state.tile_values[l.index].detach() * l.grid.tile_numel()).sum())
            for l in mm.layers]
    assert d.item() == pytest.approx(sum(kept) / mm.total_numel, rel=1e-5)
    blocks = mm.densities("expected", "block")
    assert blocks.shape == (2,)
    assert torch.all((blocks >= 0.5) & (blocks <= 1.0))


def test_gradient_checkpointing_gives_identical_gradients():
    grads = []
    for ckpt in (False, True):
        model = make_tiny_model("llama")
        mm = MaskedModel(model, "joint", tile=TILE)
        if ckpt:
            mm.enable_checkpointing()
        mm.set_values(tile_k=25.0, tile_tau=4.0, pattern_k=100.0, pattern_tau=4.0, record_norms=True)
        torch.manual_seed(123)
        model.train()  # checkpointing must not depend on train/eval
        out = model(input_ids=_inputs(), labels=_inputs())
        (out.loss + mm.densities("sampled") - mm.masked_norm_sum() * 0.01).backward()
        grads.append([p.grad.clone() for p in mm.parameters()])
        mm.remove()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_model_keeps_fp32_logits_and_grads():
    model = make_tiny_model("llama").to(torch.bfloat16)
    mm = MaskedModel(model, "joint", tile=TILE)
    mm.set_values(tile_k=25.0, tile_tau=4.0, pattern_k=100.0, pattern_tau=4.0)
    out = model(input_ids=_inputs(), labels=_inputs())
    out.loss.float().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in mm.parameters())


def test_logit_state_round_trip_and_memory():
    model = make_tiny_model("llama")
    mm = MaskedModel(model, "tile", tile=TILE, ids=_ids(model))
    st = mm.logits_state()
    assert any(k.endswith(":ids") for k in st) and not any(k.endswith(":pattern") for k in st)
    with torch.no_grad():
        for p in mm.parameters():
            p.add_(1.0)
    mm.load_logits_state(st)
    assert all(torch.equal(st[f"{l.layer_name}:tile"], l.tile_logits.detach()) for l in mm.layers)
    b = mm.logit_bytes()
    assert b["tile_logits"] < 0.01 * b["weights"] and b["pattern_logits"] == 0
    with pytest.raises(ValueError):
        mm.load_logits_state({k: v for k, v in list(st.items())[1:]})


def test_tile_mode_requires_ids():
    with pytest.raises(ValueError, match="fixed 2:4 ids"):
        MaskedModel(make_tiny_model("llama"), "tile", tile=TILE)


def test_final_maskset_recovers_the_prior_patterns_and_tiles():
    model = make_tiny_model("llama")
    pri = {l.name: pattern_prior_logits(magnitude_24(l.weight), std=0.014, strength=3.0)
           for l in find_prunable_linears(model)}
    grids = _grids(model)
    tiles = {}
    for n, g in grids.items():
        t = torch.full(g.shape, -1.0)
        t.view(-1)[0] = 1.0  # first tile of every layer starts dense
        tiles[n] = t
    mm = MaskedModel(model, "joint", tile=TILE, pattern_init=pri, tile_init=tiles)
    n_tiles = sum(g.n_rows * g.n_cols for g in grids.values())
    total = sum(g.numel for g in grids.values())
    target = 0.5 - sum(g.tile_numel()[0, 0].item() / 2 for g in grids.values()) / total
    ms = mm.final_maskset(target)
    mm.remove()
    for l in find_prunable_linears(model):
        lm = ms.layers[l.name]
        assert torch.equal(lm.ids, ids_from_mask(magnitude_24(l.weight)))
        assert lm.kinds.view(-1)[0] == 1 and int(lm.kinds.sum()) == 1  # only the first tile dense
    assert ms.meta["dense_tiles"] == len(grids) and ms.meta["tiles"] == n_tiles
