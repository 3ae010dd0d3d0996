"""PATCH ``mask.npz`` interop: their layout -> MaskSet, MaskSet -> their layout, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from patch_npz_util import (
    expand,
    load_their_npz,
    random_24,
    random_hybrid,
    save_their_npz,
    tiny_llama_weights,
)
from tilesparse.errors import TilesparseError
from tilesparse.io.patch_format import layer_mask_from_keep, read_patch_mask, write_patch_mask
from tilesparse.masks import DENSE, SPARSE, ZERO, TileGrid, ids_from_mask, topk_mask
from tilesparse.masks.maskset import LayerMask, MaskSet
from tilesparse.models import find_prunable_linears, weights_fingerprint

TILE = (32, 32)


def assert_same_masks(a: MaskSet, b: MaskSet) -> None:
    """Equal layer by layer: names, order, shapes, patterns, tiles, tile maps and keep-masks."""
    assert list(a.layers) == list(b.layers)
    for la, lb in zip(a, b):
        assert (la.out_features, la.in_features, la.pattern, tuple(la.tile)) == \
               (lb.out_features, lb.in_features, lb.pattern, tuple(lb.tile)), la.name
        if la.pattern == "hybrid":
            assert torch.equal(la.kinds, lb.kinds), la.name
        assert torch.equal(la.to_bool(), lb.to_bool()), la.name
    assert a.meta == b.meta


def hybrid_file(tmp_path, rng, *, tile=TILE, meta=None, prefix="model.layers"):
    """Their-layout file for the tiny LLaMA's shapes; returns (path, {key: keep}, {key: dense flags})."""
    keeps, dense = {}, {}
    for key, (out, inp) in tiny_llama_weights(prefix=prefix).items():
        keeps[key], dense[key] = random_hybrid(rng, out, inp, tile)
    path = tmp_path / "mask.npz"
    save_their_npz(path, keeps, meta)
    return path, keeps, dense


# --------------------------------------------------------------------------- their file -> MaskSet


def test_reads_their_hybrid_layout(tmp_path):
    path, keeps, dense = hybrid_file(tmp_path, np.random.default_rng(0))
    ms = read_patch_mask(path, tile=32)
    assert list(ms.layers) == [k[: -len(".weight")] for k in keeps]
    for key, keep in keeps.items():
        lm = ms.layers[key[: -len(".weight")]]
        assert lm.pattern == ("hybrid" if dense[key].any() else "2:4") and lm.tile == TILE
        assert torch.equal(lm.to_bool(), torch.from_numpy(keep))
        assert torch.equal(lm.tile_kinds(), torch.from_numpy(np.where(dense[key], DENSE, SPARSE).astype(np.int8)))
    assert ms.meta["model"] == "tiny" and ms.meta["target_sparsity"] == pytest.approx(0.45)
    assert ms.meta["measured_sparsity"] == pytest.approx(1 - sum(k.sum() for k in keeps.values())
                                                         / sum(k.size for k in keeps.values()))
    assert ms.meta["tile"] == [32, 32]


def test_reads_their_24_layout(tmp_path):
    rng = np.random.default_rng(1)
    keeps = {k: random_24(rng, *s) for k, s in tiny_llama_weights().items()}
    save_their_npz(tmp_path / "mask.npz", keeps, {"base_model": "tiny", "method": "MaskLLM", "sparsity": "50%"})
    ms = read_patch_mask(tmp_path)  # a folder holding mask.npz; default tile 128x128
    assert {lm.pattern for lm in ms} == {"2:4"} and {lm.tile for lm in ms} == {(128, 128)}
    assert ms.meta["pattern"] == "2:4" and ms.meta["method"] == "maskllm"
    assert ms.sparsity() == pytest.approx(0.5)
    for key, keep in keeps.items():
        assert torch.equal(ms.layers[key[:-7]].to_bool(), torch.from_numpy(keep))


def test_bit_order_is_numpy_default_big_endian(tmp_path):
    keep = np.zeros((1, 8), dtype=bool)
    keep[0, :2] = keep[0, 4:6] = True  # 2:4 groups; packbits -> 0b11001100
    save_their_npz(tmp_path / "m.npz", {"model.layers.0.fc.weight": keep})
    assert np.load(tmp_path / "m.npz")["model.layers.0.fc.weight"].tolist() == [0b11001100]
    lm = read_patch_mask(tmp_path / "m.npz", tile=(1, 8)).layers["model.layers.0.fc"]
    assert lm.to_bool().tolist() == keep.tolist()


def test_tile_from_file_record_and_argument(tmp_path):
    path, keeps, dense = hybrid_file(tmp_path, np.random.default_rng(2), tile=(64, 32),
                                     meta={"base_model": "tiny", "tile": [64, 32]})
    assert {lm.tile for lm in read_patch_mask(path)} == {(64, 32)}
    # a finer grid also splits every tile into dense and 2:4 ones; a coarser one mixes them
    ms = read_patch_mask(path, tile="32x32")
    assert {lm.tile for lm in ms} == {(32, 32)} and ms.meta["tile"] == [32, 32]
    with pytest.raises(TilesparseError, match="neither dense nor 2:4"):
        read_patch_mask(path, tile=128)


def test_empty_tiles_and_partial_edge_tiles(tmp_path):
    out, inp = 40, 72  # 32x32 tiles: partial last row and column of tiles
    dense = np.zeros((2, 3), dtype=bool)
    dense[0, 1] = dense[1, 2] = True
    keep = random_24(np.random.default_rng(3), out, inp) | expand(dense, out, inp, TILE)
    keep[:32, :32] = False  # tile (0, 0) keeps nothing
    save_their_npz(tmp_path / "m.npz", {"model.layers.0.fc.weight": keep})
    lm = read_patch_mask(tmp_path / "m.npz", tile=32).layers["model.layers.0.fc"]
    assert lm.pattern == "hybrid"
    assert lm.kinds.tolist() == [[ZERO, DENSE, SPARSE], [SPARSE, SPARSE, DENSE]]
    assert torch.equal(lm.to_bool(), torch.from_numpy(keep))


def test_layer_that_cannot_be_24_is_dense_or_an_error():
    assert layer_mask_from_keep("x", torch.ones(8, 30, dtype=torch.bool)).pattern == "dense"
    keep = torch.ones(8, 30, dtype=torch.bool)
    keep[0, 0] = False
    with pytest.raises(TilesparseError, match="x: in_features 30 is not a multiple of 4"):
        layer_mask_from_keep("x", keep)


# --------------------------------------------------------------------------- errors


def test_invalid_24_group_names_layer_tile_and_group(tmp_path):
    path, keeps, dense = hybrid_file(tmp_path, np.random.default_rng(4))
    key = "model.layers.1.mlp.up_proj.weight"
    keep = keeps[key]
    r, c = next((r, c) for r in range(4) for c in range(2) if not dense[key][r, c])  # a 2:4 tile
    row, col = 32 * r + 5, 32 * c + 8
    keep[row, col:col + 4] = [True, True, True, False]
    save_their_npz(path, keeps)
    with pytest.raises(TilesparseError) as e:
        read_patch_mask(path, tile=32)
    msg = str(e.value)
    assert "\n" not in msg and "mask.npz: model.layers.1.mlp.up_proj" in msg
    assert f"tile ({r}, {c})" in msg and f"row {row}, columns {col}-{col + 3} keeps 3 of 4" in msg


def test_tile_mixing_dense_and_24_groups_is_an_error(tmp_path):
    keep = random_24(np.random.default_rng(5), 32, 32)
    keep[:16] = True  # half the tile dense, half 2:4: every group is valid, the tile is not
    save_their_npz(tmp_path / "m.npz", {"model.layers.0.fc.weight": keep})
    with pytest.raises(TilesparseError, match=r"tile \(0, 0\).*neither dense nor 2:4: it mixes"):
        read_patch_mask(tmp_path / "m.npz", tile=32)


def test_shape_mismatch_with_model(tmp_path):
    model = make_tiny_model("llama")
    rng = np.random.default_rng(6)
    keeps = {k: random_24(rng, *s) for k, s in tiny_llama_weights().items()}
    keeps["model.layers.0.mlp.up_proj.weight"] = random_24(rng, 64, 128)  # transposed shape
    save_their_npz(tmp_path / "mask.npz", keeps)
    with pytest.raises(TilesparseError, match="different model: model.layers.0.mlp.up_proj.weight is 64x128 in "
                                              "the mask, 128x64 in the model"):
        read_patch_mask(tmp_path / "mask.npz", model)


@pytest.mark.parametrize("corrupt,msg", [
    (lambda a: a.update({"model.layers.0.fc.weight": a["model.layers.0.fc.weight"][:-1]}), "truncated or corrupt"),
    (lambda a: a.pop("model.layers.0.fc.weight.__shape__"), "has no model.layers.0.fc.weight.__shape__"),
    (lambda a: a.update({"__meta__": np.array("{not json")}), "__meta__ is not a JSON object"),
])
def test_corrupt_files(tmp_path, corrupt, msg):
    keep = random_24(np.random.default_rng(7), 8, 16)
    arrays = {"__meta__": np.array("{}"), "model.layers.0.fc.weight": np.packbits(keep.reshape(-1)),
              "model.layers.0.fc.weight.__shape__": np.array(keep.shape, dtype=np.int64)}
    corrupt(arrays)
    np.savez_compressed(tmp_path / "m.npz", **arrays)
    with pytest.raises(TilesparseError, match=msg):
        read_patch_mask(tmp_path / "m.npz")


def test_not_an_npz(tmp_path):
    (tmp_path / "m.npz").write_text("hello")
    with pytest.raises(TilesparseError, match="not a readable .npz"):
        read_patch_mask(tmp_path / "m.npz")
    with pytest.raises(TilesparseError, match="does not exist"):
        read_patch_mask(tmp_path / "nope.npz")


# --------------------------------------------------------------------------- key mapping


def test_keys_map_to_prunable_linears_and_fingerprint(tmp_path):
    model = make_tiny_model("llama")
    path, keeps, _ = hybrid_file(tmp_path, np.random.default_rng(8))
    ms = read_patch_mask(path, model, tile=32)
    assert list(ms.layers) == [l.name for l in find_prunable_linears(model)]
    assert ms.meta["fingerprint"] == weights_fingerprint(model) and "unmasked_layers" not in ms.meta
    for l in find_prunable_linears(model):
        assert torch.equal(ms.layers[l.name].to_bool(), torch.from_numpy(keeps[f"{l.name}.weight"]))


def test_wrapper_prefix_maps_by_block_and_missing_layers_stay_dense(tmp_path):
    model = make_tiny_model("llama")
    rng = np.random.default_rng(9)
    keeps = {k: random_24(rng, *s) for k, s in tiny_llama_weights(prefix="model.language_model.layers").items()}
    del keeps["model.language_model.layers.1.mlp.down_proj.weight"]
    save_their_npz(tmp_path / "mask.npz", keeps)
    ms = read_patch_mask(tmp_path / "mask.npz", model)
    assert torch.equal(ms.layers["model.layers.0.self_attn.k_proj"].to_bool(),
                       torch.from_numpy(keeps["model.language_model.layers.0.self_attn.k_proj.weight"]))
    assert ms.layers["model.layers.1.mlp.down_proj"].pattern == "dense"
    assert ms.meta["unmasked_layers"] == ["model.layers.1.mlp.down_proj"]


def test_unknown_key_is_a_different_model(tmp_path):
    rng = np.random.default_rng(10)
    keeps = {k: random_24(rng, *s) for k, s in tiny_llama_weights(layers=3).items()}  # the model has 2 blocks
    save_their_npz(tmp_path / "mask.npz", keeps)
    with pytest.raises(TilesparseError, match="different model: it masks model.layers.2.self_attn.q_proj.weight"):
        read_patch_mask(tmp_path / "mask.npz", make_tiny_model("llama"))


# --------------------------------------------------------------------------- MaskSet -> their file


def random_maskset(pattern: str, seed: int, tile=(16, 32)) -> MaskSet:
    """Hybrid (with dense, 2:4 and empty tiles; every layer has a dense tile) or 2:4 layers, partial tiles."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (out, inp) in enumerate([(40, 72), (16, 32), (33, 100)]):
        name = f"model.layers.{i}.proj"
        ids = ids_from_mask(topk_mask(torch.randn(out, inp, generator=gen)))
        if pattern == "2:4":
            layers[name] = LayerMask(name, out, inp, "2:4", tile, ids=ids)
            continue
        kinds = torch.randint(0, 3, TileGrid(out, inp, *tile).shape, generator=gen).to(torch.int8)
        kinds.view(-1)[0] = DENSE
        layers[name] = LayerMask(name, out, inp, "hybrid", tile, kinds=kinds, ids=ids)
    meta = {"model": "m", "fingerprint": "abc", "method": "patch", "pattern": pattern, "tile": list(tile),
            "target_sparsity": 0.35, "calibration": {"samples": 2, "seqlen": 8}}
    return MaskSet(layers, meta)


@pytest.mark.parametrize("pattern", ["hybrid", "2:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip(tmp_path, pattern, seed):
    ms = random_maskset(pattern, seed)
    path = write_patch_mask(ms, tmp_path / "mask.npz")
    back = read_patch_mask(path)
    assert_same_masks(back, ms)
    assert {lm.pattern for lm in back} == {pattern}
    # their loader reads the same keep-masks, keyed by parameter name, in [out, in]
    masks, meta = load_their_npz(path)
    assert list(masks) == [f"{n}.weight" for n in ms.layers]
    for lm in ms:
        assert np.array_equal(masks[f"{lm.name}.weight"], lm.to_bool().numpy())
    assert meta["sparsity"] == "35%" and meta["tile"] == [16, 32]
    assert meta["pattern"] == ("2:4" if pattern == "2:4" else "Dense/2:4 tiles")


def test_round_trip_keeps_per_layer_tiles(tmp_path):
    ms = random_maskset("hybrid", 3)
    lm = ms.layers["model.layers.1.proj"]
    ms.layers[lm.name] = layer_mask_from_keep(lm.name, lm.to_bool(), (8, 16))
    back = read_patch_mask(write_patch_mask(ms, tmp_path / "m.npz"))
    assert [l.tile for l in back] == [(16, 32), (8, 16), (16, 32)]
    assert_same_masks(back, ms)


def test_written_file_matches_their_layout_byte_for_byte(tmp_path):
    path, keeps, _ = hybrid_file(tmp_path, np.random.default_rng(11))
    ms = read_patch_mask(path, tile=32)
    mine = write_patch_mask(ms, tmp_path / "out")  # a folder -> out/mask.npz
    assert mine == tmp_path / "out" / "mask.npz"
    theirs, mine_z = np.load(path), np.load(mine)
    assert set(theirs.files) == set(mine_z.files)
    for k in theirs.files:
        if k == "__meta__":
            continue
        assert theirs[k].dtype == mine_z[k].dtype and np.array_equal(theirs[k], mine_z[k]), k
    meta = json.loads(str(mine_z["__meta__"]))
    assert meta["base_model"] == "tiny" and meta["tilesparse"]["source"]["meta"]["sparsity"] == "45%"


def test_transposed_conv1d_layers(tmp_path):
    model = make_tiny_model("gpt2")
    rng = np.random.default_rng(12)
    layers = {}
    for l in find_prunable_linears(model):
        keep = torch.from_numpy(random_hybrid(rng, l.out_features, l.in_features, TILE)[0])
        layers[l.name] = layer_mask_from_keep(l.name, keep, TILE)
    ms = MaskSet(layers, {"model": "gpt2", "method": "patch"})
    path = write_patch_mask(ms, tmp_path / "mask.npz", model)
    masks, _ = load_their_npz(path)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert m.shape == tuple(params[name].shape)  # the module's own [in, out]
    back = read_patch_mask(path, model, tile=32)
    for lm in ms:
        assert torch.equal(back.layers[lm.name].to_bool(), lm.to_bool())
