"""HybridLinear drop-in equivalence, model conversion, packed safetensors round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from kernels_testutil import interp, make_layer  # noqa: F401 (fixtures)
from torch import nn

from tilesparse.io.packed import load_packed, load_packed_model, save_packed, save_packed_model
from tilesparse.kernels import HybridLinear, convert_model, hybrid_layers
from tilesparse.kernels.format import unpack
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import TileGrid, hybrid_mask


def _tiny_llama(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return tf.LlamaForCausalLM(cfg).eval()


def _masks(model, tile=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear):
            grid = TileGrid(m.out_features, m.in_features, *tile)
            kinds = torch.randint(0, 3, grid.shape, generator=g).to(torch.int8)
            m24 = topk_mask(torch.rand(m.weight.shape, generator=g))
            out[f"model.layers.{n}"] = hybrid_mask(kinds, m24, grid)
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_in_equals_masked_linear(make_layer, bias, dtype):
    lin = nn.Linear(200, 100, bias=bias).to(dtype)
    _, mask, _ = make_layer(100, 200, (32, 64), 0.5, 0.2)
    hyb = HybridLinear.from_linear(lin, mask, (32, 64))
    ref = copy.deepcopy(lin)
    with torch.no_grad():
        ref.weight.mul_(mask)
    x = torch.randn(3, 7, 200).to(dtype)
    assert torch.equal(hyb(x), ref(x))
    assert torch.equal(hyb.weight, ref.weight)
    assert hyb.nbytes() < sum(p.numel() * p.element_size() for p in lin.parameters())


def test_input_on_another_device_is_a_one_line_error(make_layer):
    lin = nn.Linear(64, 64)
    _, mask, _ = make_layer(64, 64, (32, 32), 0.5, 0.2)
    hyb = HybridLinear.from_linear(lin, mask, (32, 32))
    with pytest.raises(ValueError, match=r"^input is on meta, the layer's weights are on cpu$"):
        hyb(torch.empty(2, 64, device="meta"))


def test_to_dtype_rebuilds_packed_view(make_layer):
    lin = nn.Linear(64, 64)
    _, mask, _ = make_layer(64, 64, (32, 32), 0.5, 0.2)
    hyb = HybridLinear.from_linear(lin, mask, (32, 32))
    x = torch.randn(2, 64)
    y32 = hyb(x)
    hyb = hyb.to(torch.bfloat16)
    assert hyb.packed.dtype == torch.bfloat16
    y16 = hyb(x.bfloat16())
    assert torch.allclose(y16.float(), y32, atol=0.1, rtol=0.05)


def test_buffers_replaced_behind_the_module_rebuild_its_view(make_layer):
    lin = nn.Linear(64, 64)
    _, mask, _ = make_layer(64, 64, (32, 32), 0.5, 0.2)
    hyb = HybridLinear.from_linear(lin, mask, (32, 32))
    x = torch.randn(3, 64)
    y = hyb(x)
    # as accelerate's device placement does: new tensors written straight into the buffer dict
    for name in ("packed_dn_vals", "packed_sp_vals"):
        hyb._buffers[name] = hyb._buffers[name] * 2
    assert hyb.packed.dn_vals is hyb.packed_dn_vals
    torch.testing.assert_close(hyb(x), 2 * y - hyb.bias, rtol=1e-5, atol=1e-5)
    # load_state_dict(assign=True) replaces the tensors through setattr
    state = {k: v / 2 if k in ("packed_dn_vals", "packed_sp_vals") else v for k, v in hyb.state_dict().items()}
    hyb.load_state_dict(state, assign=True)
    torch.testing.assert_close(hyb(x), y, rtol=1e-5, atol=1e-5)


def test_triton_path_in_module(interp, make_layer):
    lin = nn.Linear(200, 100).bfloat16()
    _, mask, _ = make_layer(100, 200, (32, 64), 0.5, 0.2)
    ref = HybridLinear.from_linear(lin, mask, (32, 64))
    tri = HybridLinear.from_linear(lin, mask, (32, 64), use_triton=True)
    x = torch.randn(5, 200).bfloat16()
    a, b = tri(x).double(), ref(x).double()
    assert ((a - b).norm() / b.norm()).item() < 1e-2


def converted_and_masked():
    """A tiny LLaMA with hybrid layers, and a copy with the same masks applied to its dense weights."""
    model = _tiny_llama()
    masks = _masks(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in masks.items():
            ref.get_submodule(n).weight.mul_(m)
    convert_model(model, masks, tile=(32, 32))
    return model, ref


def test_convert_model_matches_masked_model():
    model, ref = converted_and_masked()
    assert len(hybrid_layers(model)) == 14
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_convert_model_errors():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="does not have"):
        convert_model(model, {"model.layers.9.mlp.up_proj": torch.ones(128, 64, dtype=torch.bool)})
    with pytest.raises(TypeError, match="not nn.Linear"):
        convert_model(model, {"model.layers.0.mlp": torch.ones(128, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask shape"):
        convert_model(model, {"model.layers.0.mlp.up_proj": torch.ones(64, 64, dtype=torch.bool)})
    bad = torch.rand(128, 64) > 0.5  # unstructured: not a hybrid mask
    with pytest.raises(ValueError, match="up_proj.*neither dense"):
        convert_model(model, {"model.layers.0.mlp.up_proj": bad}, tile=(32, 32))


def test_save_load_layer_round_trip(tmp_path, make_layer):
    W, mask, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.bfloat16)
    bias = torch.randn(100).bfloat16()
    size = save_packed(tmp_path / "l.safetensors", {"a.b": p}, {"a.b": bias})
    layers, biases, state, meta = load_packed(tmp_path / "l.safetensors")
    assert meta["layers"]["a.b"]["tile_rows"] == 32 and not state
    assert torch.equal(unpack(layers["a.b"]), W * mask)
    assert torch.equal(biases["a.b"], bias)
    assert size < 100 * 200 * 2 + 100 * 2 + 4096  # smaller than the dense layer (+ header)


def test_save_load_model_round_trip(tmp_path):
    model = _tiny_llama()
    convert_model(model, _masks(model), tile=(32, 32))
    path = tmp_path / "m.safetensors"
    save_packed_model(model, path, extra_metadata={"note": "test"})
    fresh = _tiny_llama(seed=1)  # same architecture, other weights
    load_packed_model(fresh, path)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert len(hybrid_layers(fresh)) == 14


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a tilesparse packed file"):
        load_packed(tmp_path / "x.safetensors")
