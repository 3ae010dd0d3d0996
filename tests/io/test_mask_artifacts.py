"""Mask-only artifacts: round trip, application to the base model, and clear errors for bad files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from tilesparse.errors import TilesparseError
from tilesparse.io import (
    FORMAT,
    apply_mask_file,
    apply_masks,
    load_mask_artifact,
    pack_bits,
    read_mask_header,
    save_mask_artifact,
    save_pruned_model,
    unpack_bits,
)
from tilesparse.masks import TileGrid, ids_from_mask, topk_mask
from tilesparse.masks.maskset import LayerMask, MaskSet
from tilesparse.models import LoadedModel, find_prunable_linears, weights_fingerprint
from tilesparse.pruning import PruneConfig, prune_model

settings.register_profile("tilesparse", max_examples=60, deadline=None)
settings.load_profile("tilesparse")


@st.composite
def masksets(draw):
    layers = {}
    for i in range(draw(st.integers(1, 4))):
        out, inp = draw(st.integers(1, 30)), draw(st.integers(1, 40))
        pattern = draw(st.sampled_from(["unstructured", "2:4", "hybrid", "dense"]))
        if pattern in ("2:4", "hybrid"):
            inp = 4 * max(1, inp // 4)
        tile = (draw(st.integers(1, 16)), 4 * draw(st.integers(1, 4)))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        kw = {}
        if pattern == "unstructured":
            kw["keep"] = torch.rand(out, inp, generator=gen) > 0.5
        if pattern in ("2:4", "hybrid"):
            kw["ids"] = ids_from_mask(topk_mask(torch.randn(out, inp, generator=gen)))
        if pattern == "hybrid":
            kw["kinds"] = torch.randint(0, 3, TileGrid(out, inp, *tile).shape, generator=gen).to(torch.int8)
        name = f"model.layers.{i}.proj"
        layers[name] = LayerMask(name, out, inp, pattern, tile, **kw)
    meta = {"model": "m", "fingerprint": "abc", "method": "wanda", "pattern": "mixed", "target_sparsity": 0.3,
            "calibration": {"text": "Emma", "samples": 2, "seqlen": 8, "seed": 0}, "tile": [16, 16]}
    return MaskSet(layers, meta)


@given(masksets(), st.booleans())
def test_mask_file_round_trip(ms, as_file):
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / ("x.safetensors" if as_file else "outdir")
        written = save_mask_artifact(ms, target)
        assert written.is_file()
        back = load_mask_artifact(target)
    assert back.meta == ms.meta
    assert list(back.layers) == list(ms.layers)
    for name, lm in ms.layers.items():
        b = back.layers[name]
        assert (b.pattern, b.tile, b.out_features, b.in_features) == (lm.pattern, lm.tile, lm.out_features,
                                                                       lm.in_features)
        assert torch.equal(b.to_bool(), lm.to_bool())
        if lm.pattern == "hybrid":
            assert torch.equal(b.kinds, lm.kinds) and torch.equal(b.ids, lm.ids)


@given(st.integers(0, 200), st.integers(0, 2**31 - 1))
def test_pack_bits_round_trip(n, seed):
    m = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5
    p = pack_bits(m)
    assert p.dtype == torch.uint8 and p.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(p, (n,)), m)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model = make_tiny_model("llama")
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ms = prune_model(model, calib, PruneConfig(method="wanda", pattern="hybrid", sparsity=0.3, tile=16),
                     progress=False)
    path = tmp_path_factory.mktemp("mask") / "run"
    save_mask_artifact(ms, path)
    return ms, path


def test_apply_to_unmodified_base_model(pruned):
    ms, path = pruned
    base = make_tiny_model("llama")  # a fresh copy of the same weights
    before = {l.name: l.weight.detach().clone() for l in find_prunable_linears(base)}
    loaded = LoadedModel(base, None, "tiny", "memory")
    back = apply_mask_file(loaded, path)
    assert back.meta["fingerprint"] == ms.meta["fingerprint"]
    assert back.meta["measured_sparsity"] == pytest.approx(ms.sparsity())
    zeros = total = 0
    for l in find_prunable_linears(base):
        keep = ms.layers[l.name].to_bool()
        assert torch.equal(l.weight.detach(), before[l.name] * keep)
        zeros += int((l.weight == 0).sum())
        total += l.numel
    assert zeros / total == pytest.approx(ms.sparsity())
    header = read_mask_header(path)
    assert header["meta"]["pattern"] == "hybrid" and header["meta"]["tile"] == [16, 16]


def test_mask_for_another_model_is_refused(pruned):
    _, path = pruned
    with pytest.raises(TilesparseError, match="fingerprint"):
        load_mask_artifact(path, make_tiny_model("llama", seed=1))
    with pytest.raises(TilesparseError, match="different model"):
        load_mask_artifact(path, make_tiny_model("gpt2"))
    with pytest.raises(TilesparseError, match="different model"):
        load_mask_artifact(path, make_tiny_model("llama", layers=3), check_fingerprint=False)
    other = make_tiny_model("llama", seed=1)
    assert load_mask_artifact(path, other, check_fingerprint=False).meta["method"] == "wanda"


def test_truncated_corrupt_and_foreign_files(pruned, tmp_path):
    _, path = pruned
    data = (path / "masks.safetensors").read_bytes()
    for i, cut in enumerate((len(data) // 2, len(data) - 3, 5)):
        f = tmp_path / f"cut{i}.safetensors"
        f.write_bytes(data[:cut])
        with pytest.raises(TilesparseError, match="truncated or corrupt"):
            load_mask_artifact(f)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    f = tmp_path / "flip.safetensors"
    f.write_bytes(bytes(flipped))
    with pytest.raises(TilesparseError, match="corrupt"):
        load_mask_artifact(f)
    with pytest.raises(TilesparseError, match="does not exist"):
        load_mask_artifact(tmp_path / "nowhere")

    from safetensors.torch import save_file

    header = read_mask_header(path)
    t = {"a": torch.zeros(1)}
    save_file(t, str(tmp_path / "v99.safetensors"),
              metadata={"format": FORMAT, "format_version": "99", "header": json.dumps(header)})
    with pytest.raises(TilesparseError, match="version 99"):
        load_mask_artifact(tmp_path / "v99.safetensors")
    save_file(t, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TilesparseError, match="not a tilesparse mask"):
        load_mask_artifact(tmp_path / "foreign.safetensors")


def test_apply_masks_checks_shapes(pruned):
    ms, _ = pruned
    with pytest.raises(TilesparseError, match="different model"):
        apply_masks(make_tiny_model("opt"), ms)


def test_save_pruned_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    ms = prune_model(model, None, PruneConfig(method="magnitude", pattern="2:4"), progress=False)
    apply_masks(model, ms)
    out = save_pruned_model(LoadedModel(model, None, "tiny", "memory"), tmp_path / "pruned", ms)
    assert (out / "config.json").is_file() and (out / "masks.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(str(out))
    for a, b in zip(find_prunable_linears(again), find_prunable_linears(model)):
        assert torch.equal(a.weight, b.weight)
    assert weights_fingerprint(again) == weights_fingerprint(model)
