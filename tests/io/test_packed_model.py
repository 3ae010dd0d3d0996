"""Packed model files rebuild the whole model, non-persistent buffers included (built on the meta device)."""

import json

import pytest
import torch
from torch import nn

from tilesparse.io.packed import load_packed, load_packed_model, non_persistent_buffers, save_packed_model
from tilesparse.kernels.linear import convert_model
from tilesparse.masks.nm import topk_mask

from conftest import make_tiny_model


def _all_24_masks(model):
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{n}": topk_mask(torch.rand(m.weight.shape, generator=g))
            for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def _meta_built(config):
    """The architecture on the meta device, then given real (uninitialised) storage, as loaders do."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    for b in non_persistent_buffers(model).values():  # make stale buffers obvious, not lucky
        b.fill_(float("nan"))
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_meta_built_model_gets_the_shipped_rotary_buffers(tmp_path, arch):
    model = make_tiny_model(arch).eval()
    assert non_persistent_buffers(model)  # rotary inv_freq: not in state_dict
    convert_model(model, _all_24_masks(model), tile=(32, 32))
    path = tmp_path / "m.safetensors"
    save_packed_model(model, path)
    fresh = _meta_built(model.config)
    load_packed_model(fresh, path)
    if getattr(model.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    for key, t in non_persistent_buffers(model).items():
        assert torch.equal(non_persistent_buffers(fresh)[key], t)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_meta_is_filled_without_materialising_dense_weights(tmp_path, monkeypatch, dtype):
    """A model left on the meta device gets the packed layers and the file's other tensors, in its own dtype,
    and nothing allocates the dense model first (``to_empty`` would)."""
    import transformers as tf

    model = make_tiny_model("llama").eval()
    convert_model(model, _all_24_masks(model), tile=(32, 32))
    path = tmp_path / "m.safetensors"
    save_packed_model(model, path)
    with torch.device("meta"):
        fresh = tf.AutoModelForCausalLM.from_config(model.config, dtype=dtype).eval()
    monkeypatch.setattr(nn.Module, "to_empty", lambda *a, **k: pytest.fail("the dense model was materialised"))
    load_packed_model(fresh, path, device="cpu")
    fresh.tie_weights()
    tensors = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
    assert not [n for n, t in tensors.items() if t.is_meta]
    assert all(t.dtype == dtype for n, t in fresh.named_parameters())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits.float(), model(ids).logits,
                                   **({} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}))


def test_file_without_buffers_is_refused_with_a_clear_message(tmp_path):
    model = make_tiny_model("llama").eval()
    convert_model(model, _all_24_masks(model), tile=(32, 32))
    path = tmp_path / "m.safetensors"
    save_packed_model(model, path, buffers={})  # as files written before buffers were shipped
    _, _, _, meta = load_packed(path)
    assert meta["buffers"] == []
    with pytest.raises(ValueError, match="non-persistent buffers missing"):
        load_packed_model(_meta_built(model.config), path)
    # the oldest files have no 'buffers' entry at all
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = json.loads(f.metadata()["tilesparse"])
    raw.pop("buffers")
    save_file(tensors, str(path), metadata={"tilesparse": json.dumps(raw)})
    with pytest.raises(ValueError, match="export it again"):
        load_packed_model(_meta_built(model.config), path)


def test_bf16_file_loads_into_a_float32_model(tmp_path):
    model = make_tiny_model("llama").eval()
    buffers = {k: t.clone() for k, t in non_persistent_buffers(model).items()}  # fp32, before the cast
    model = model.to(torch.bfloat16)
    convert_model(model, _all_24_masks(model), tile=(32, 32))
    path = tmp_path / "m.safetensors"
    save_packed_model(model, path, buffers=buffers)
    fresh = _meta_built(model.config)  # float32
    load_packed_model(fresh, path)
    fresh.tie_weights()
    assert all(t.dtype == torch.float32 for t in non_persistent_buffers(fresh).values())
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = fresh(ids).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_4bit_layers_round_trip_and_set_the_file_version(tmp_path):
    """A file with a 4-bit layer is version 2 and loads back tensor for tensor; one without stays version 1
    (readable by libraries that know only 16-bit layers); a newer version is refused in one line."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tilesparse.io.packed import save_packed
    from tilesparse.kernels.format import pack
    from tilesparse.kernels.format_q4 import PackedHybridQ4, pack_q4
    from tilesparse.masks.nm import topk_mask
    from tilesparse.masks.tiles import TileGrid, classify_tiles
    from tilesparse.quant import quantize_rtn

    W = torch.randn(32, 64)
    mask = topk_mask(W.abs())
    mask[:16, :32] = True  # one dense tile
    q = quantize_rtn(W, mask, group_size=24)
    p4 = pack_q4(q.quantized, classify_tiles(mask, TileGrid(32, 64, 16, 32)), mask, (16, 32))
    p16 = pack(W.bfloat16(), mask, (16, 32))

    def version(path):
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["tilesparse"])["version"]

    save_packed(tmp_path / "v1.safetensors", {"a": p16})
    save_packed(tmp_path / "v2.safetensors", {"a": p16, "b": p4}, {"b": torch.ones(32, dtype=torch.bfloat16)})
    assert version(tmp_path / "v1.safetensors") == 1 and version(tmp_path / "v2.safetensors") == 2
    layers, biases, _, _ = load_packed(tmp_path / "v2.safetensors")
    assert isinstance(layers["b"], PackedHybridQ4) and layers["b"].group_size == 24
    assert all(torch.equal(layers["b"].stored_tensors()[k], t) for k, t in p4.stored_tensors().items())
    assert torch.equal(layers["b"].unpack(), q.weight * mask) and torch.equal(biases["b"], torch.ones(32).bfloat16())
    assert torch.equal(layers["a"].unpack(), p16.unpack())

    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["tilesparse"]), {k: f.get_tensor(k) for k in f.keys()}
    meta["version"] = 3
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata={"tilesparse": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version 3 is newer"):
        load_packed(tmp_path / "v3.safetensors")
