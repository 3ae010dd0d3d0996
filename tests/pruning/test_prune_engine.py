"""The layer-by-layer calibration engine on tiny models of every supported architecture."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_tiny_model
from tilesparse.errors import TilesparseError
from tilesparse.masks import DENSE, classify_tiles, is_2to4
from tilesparse.models import LoadedModel, find_decoder_blocks, find_prunable_linears, weights_fingerprint
from tilesparse.pruning import (
    DenseLayerWarning,
    PruneConfig,
    prune_model,
    prune_model_multi,
    prune_text,
    select_2to4,
    wanda_scores,
)

CALIB = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_architecture_every_pattern_leaves_weights_alone(tiny_any, method):
    before = _state(tiny_any)
    fp = weights_fingerprint(tiny_any)
    layers = find_prunable_linears(tiny_any)
    for pattern, s in (("unstructured", 0.6), ("2:4", None), ("hybrid", 0.3)):
        ms = prune_model(tiny_any, CALIB, PruneConfig(method=method, pattern=pattern, sparsity=s, tile=16),
                         progress=False)
        assert set(ms.layers) == {l.name for l in layers}
        for k, v in tiny_any.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed"
        meta = ms.meta
        assert meta["fingerprint"] == fp and meta["method"] == method and meta["pattern"] == pattern
        assert meta["tile"] == [16, 16] and meta["measured_sparsity"] == ms.sparsity()
        assert (meta["calibration"] is None) == (method == "magnitude")
        target = 0.5 if s is None else s
        assert meta["target_sparsity"] == target
        if pattern == "hybrid":
            biggest = 16 * 16 / 2 / sum(l.numel for l in layers)
            assert abs(ms.sparsity() - target) <= biggest + 1e-12
            for lm in ms:
                assert torch.equal(classify_tiles(lm.to_bool(), lm.grid), lm.kinds)
        elif pattern == "2:4":
            assert all(is_2to4(lm.to_bool()) for lm in ms)
        else:
            assert abs(ms.sparsity() - target) < 0.01


def test_sparsegpt_update_weights_keeps_pruned_updated_weights(tiny_llama):
    before = _state(tiny_llama)
    fp = weights_fingerprint(tiny_llama)
    ms = prune_model(tiny_llama, CALIB, PruneConfig(method="sparsegpt", pattern="2:4", update_weights=True),
                     progress=False)
    assert ms.meta["fingerprint"] == fp != weights_fingerprint(tiny_llama)
    for l in find_prunable_linears(tiny_llama):
        keep = ms.layers[l.name].to_bool()
        assert (l.weight[~keep] == 0).all()
        orig = before[l.name + ".weight"]
        assert not torch.allclose(l.weight[keep], orig[keep])  # reconstructed, not just masked
    # modules outside the decoder blocks are untouched
    assert torch.equal(tiny_llama.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_blocks_are_calibrated_sequentially_on_pruned_outputs(tiny_llama):
    """Block 1's Wanda mask must come from the outputs of the *pruned* block 0."""
    cfg = PruneConfig(method="wanda", pattern="2:4")
    ms = prune_model(tiny_llama, CALIB, cfg, progress=False)
    layers = find_prunable_linears(tiny_llama)
    first = [l for l in layers if l.block_index == 0]
    target = next(l for l in layers if l.block_index == 1 and l.short_name.endswith("q_proj"))
    originals = {l.name: l.weight.detach().clone() for l in first}
    for l in first:
        l.apply_mask(ms.layers[l.name].to_bool())
    sq = torch.zeros(target.in_features, dtype=torch.float64)

    def hook(_m, args, _o):
        nonlocal sq
        sq += args[0].detach().reshape(-1, target.in_features).double().pow(2).sum(0)

    h = target.module.register_forward_hook(hook)
    with torch.no_grad():
        tiny_llama(input_ids=CALIB, use_cache=False)
    h.remove()
    for l in first:
        l.set_weight(originals[l.name])
    expected = select_2to4(wanda_scores(target.weight, sq))
    assert torch.equal(ms.layers[target.name].to_bool(), expected)


def test_multi_pass_lead_equals_single_run(tiny_llama):
    a = PruneConfig(method="sparsegpt", pattern="2:4")
    b = PruneConfig(method="sparsegpt", pattern="unstructured", sparsity=0.4)
    m24, mun = prune_model_multi(tiny_llama, CALIB, [a, b], progress=False)
    single = prune_model(tiny_llama, CALIB, a, progress=False)
    for n in single.layers:
        assert torch.equal(single.layers[n].to_bool(), m24.layers[n].to_bool())
    assert mun.meta["pattern"] == "unstructured" and abs(mun.sparsity() - 0.4) < 0.01
    with pytest.raises(TilesparseError, match="first"):
        prune_model_multi(tiny_llama, CALIB, [a, PruneConfig(update_weights=True)], progress=False)


def test_given_tile_map_is_used(tiny_llama):
    cfg = PruneConfig(method="magnitude", pattern="hybrid", sparsity=0.25, tile=16)
    layers = find_prunable_linears(tiny_llama)
    kinds = {}
    for l in layers:
        k = torch.zeros((l.out_features + 15) // 16, l.in_features // 16, dtype=torch.int8)
        k[0, 0] = DENSE
        kinds[l.name] = k
    ms = prune_model(tiny_llama, None, cfg, progress=False, tile_kinds=kinds)
    assert all(torch.equal(ms.layers[n].kinds, kinds[n]) for n in kinds)
    with pytest.raises(TilesparseError, match="tile map"):
        prune_model(tiny_llama, None, cfg, progress=False, tile_kinds={})


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_column_tile_maps_keep_whole_tile_columns(tiny_llama, method):
    free = prune_model(tiny_llama, CALIB, PruneConfig(method=method, pattern="hybrid", sparsity=0.3, tile=16),
                       progress=False)
    cols = prune_model(tiny_llama, CALIB, PruneConfig(method=method, pattern="hybrid", sparsity=0.3, tile=16,
                                                      tile_map="columns"), progress=False)
    assert cols.meta["tile_map"] == "columns" and abs(cols.sparsity() - 0.3) < 0.05
    kinds = [lm.kinds for lm in cols.layers.values() if lm.pattern == "hybrid"]
    assert all(bool((k == k[:1]).all()) for k in kinds) and any(bool((k == DENSE).any()) for k in kinds)
    # the free map of the same prior is not column-shaped: the option changed the choice
    assert not all(bool((lm.kinds == lm.kinds[:1]).all()) for lm in free.layers.values() if lm.pattern == "hybrid")


def test_layers_that_cannot_be_24_stay_dense_and_are_reported():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=130, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = tf.LlamaForCausalLM(cfg).eval()
    for pattern, s in (("2:4", None), ("hybrid", 0.2)):
        with pytest.warns(DenseLayerWarning, match="mlp.down_proj"):
            ms = prune_model(model, CALIB, PruneConfig(method="wanda", pattern=pattern, sparsity=s, tile=32),
                             progress=False)
        assert ms.meta["dense_layers"] == ["model.layers.0.mlp.down_proj"]
        assert ms.layers["model.layers.0.mlp.down_proj"].pattern == "dense"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseLayerWarning)
        ms = prune_model(model, CALIB, PruneConfig(method="wanda", pattern="unstructured"), progress=False)
    assert ms.layers["model.layers.0.mlp.down_proj"].pattern == "unstructured"


def test_bad_calibration_input(tiny_llama):
    cfg = PruneConfig(method="wanda", pattern="2:4")
    with pytest.raises(TilesparseError, match="calibration"):
        prune_model(tiny_llama, None, cfg, progress=False)
    with pytest.raises(TilesparseError, match="integer tensor"):
        prune_model(tiny_llama, torch.zeros(4), cfg, progress=False)
    with pytest.raises(TilesparseError, match="too small"):
        prune_model(tiny_llama, torch.zeros(2, 1, dtype=torch.long), cfg, progress=False)


class _CharTokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [2 + (ord(c) % 120) for c in text]}


def test_prune_text_and_short_text(tiny_llama, tmp_path):
    loaded = LoadedModel(tiny_llama, _CharTokenizer(), "tiny-llama", "memory")
    short = tmp_path / "short.txt"
    short.write_text("far too short")
    with pytest.raises(TilesparseError, match="too short"):
        prune_text(loaded, PruneConfig(method="wanda"), calib_source=str(short), samples=2, seqlen=32)
    text = tmp_path / "long.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    ms = prune_text(loaded, PruneConfig(method="sparsegpt", pattern="hybrid", sparsity=0.35, tile=16),
                    calib_source=str(text), samples=3, seqlen=32, seed=5, progress=False)
    assert ms.meta["model"] == "tiny-llama"
    assert ms.meta["calibration"] == {"text": "long.txt", "source": str(text), "samples": 3, "seqlen": 32,
                                      "seed": 5, "bos": False}
    assert ms.meta["tile_budget"]["achieved_sparsity"] == pytest.approx(ms.sparsity())


def test_progress_bar_names_blocks(tiny_llama, capsys):
    prune_model(tiny_llama, CALIB, PruneConfig(method="wanda"), progress=True)
    err = capsys.readouterr().err
    assert "wanda 2:4" in err and "blocks" in err
    assert len(find_decoder_blocks(tiny_llama)[1]) == 2


def test_refit_keeps_the_mask_and_moves_the_outputs_back_towards_dense(tiny_any):
    from tilesparse.io import apply_masks
    from tilesparse.pruning import refit_weights

    model = tiny_any
    with torch.no_grad():
        dense = model(input_ids=CALIB).logits
    masks = prune_model(model, CALIB, PruneConfig(method="wanda", pattern="hybrid", sparsity=0.4, tile=16),
                        progress=False)
    before = _state(model)
    apply_masks(model, masks)
    with torch.no_grad():
        masked = model(input_ids=CALIB).logits
    for k, v in before.items():
        model.state_dict()[k].copy_(v)
    info = refit_weights(model, CALIB, masks, progress=False)
    assert not info["fallback_layers"]
    for layer in find_prunable_linears(model):
        keep = masks.layers[layer.name].to_bool()
        w = layer.module.weight.detach()
        w = w.t() if layer.transposed else w
        assert bool((w[~keep] == 0).all()), layer.name  # exactly the given mask
    with torch.no_grad():
        refit = model(input_ids=CALIB).logits
    assert (refit - dense).pow(2).mean() < (masked - dense).pow(2).mean()


def test_refit_keeping_the_tiles_rechooses_the_patterns_inside_the_same_tile_map(tiny_llama):
    from tilesparse.masks.tiles import SPARSE
    from tilesparse.pruning import refit_weights

    model = tiny_llama
    masks = prune_model(model, CALIB, PruneConfig(method="wanda", pattern="hybrid", sparsity=0.4, tile=16),
                        progress=False)
    before = _state(model)
    ref = prune_model(model, CALIB, PruneConfig(method="sparsegpt", pattern="hybrid", sparsity=0.4, tile=16,
                                                update_weights=True),
                      tile_kinds={n: lm.kinds for n, lm in masks.layers.items()}, progress=False)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in before.items():
        model.state_dict()[k].copy_(v)
    info = refit_weights(model, CALIB, masks, keep="tiles", progress=False)
    out = info["maskset"]
    assert all(torch.equal(out.layers[n].kinds, lm.kinds) for n, lm in masks.layers.items())  # same tile map
    changed = sum(int((out.layers[n].ids != lm.ids)[lm.grid.expand(lm.kinds == SPARSE)[:, ::4]].sum())
                  for n, lm in masks.layers.items())
    assert changed > 0  # SparseGPT picked other 2:4 patterns than Wanda's
    assert all(torch.equal(out.layers[n].to_bool(), ref.layers[n].to_bool()) for n in masks.layers)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())  # SparseGPT's own update
    assert out.meta["refit"].startswith("tiles") and out.meta["fingerprint"] == masks.meta["fingerprint"]
    with pytest.raises(TilesparseError, match="refit keeps one of mask, tiles"):
        refit_weights(model, CALIB, masks, keep="patterns", progress=False)


def test_refit_refuses_a_mask_of_another_model(tiny_llama):
    from tilesparse.pruning import refit_weights

    other = prune_model(make_tiny_model("llama", layers=1), CALIB, PruneConfig(method="magnitude"), progress=False)
    with pytest.raises(TilesparseError, match="has no layer"):
        refit_weights(tiny_llama, CALIB, other, progress=False)
