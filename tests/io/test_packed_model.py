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
