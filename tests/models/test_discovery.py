import pytest
import torch
from torch import nn

from conftest import ARCHES, make_tiny_model
from tilesparse.errors import TilesparseError
from tilesparse.models import find_decoder_blocks, find_prunable_linears

EXPECTED_STACK = {"llama": "model.layers", "qwen2": "model.layers", "gemma3": "model.layers",
                  "gpt2": "transformer.h", "opt": "model.decoder.layers"}


@pytest.mark.parametrize("arch", ARCHES)
def test_finds_decoder_linears(arch):
    model = make_tiny_model(arch)
    stack, blocks = find_decoder_blocks(model)
    assert stack == EXPECTED_STACK[arch]
    layers = find_prunable_linears(model)
    per_block = len(layers) // len(blocks)
    assert per_block * len(blocks) == len(layers) and per_block >= 4
    names = [l.name for l in layers]
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert [l.block_index for l in layers] == sorted(l.block_index for l in layers)
    for l in layers:
        assert model.get_submodule(l.name) is l.module


@pytest.mark.parametrize("arch", ARCHES)
def test_weight_orientation_and_masking(arch):
    model = make_tiny_model(arch)
    lin = find_prunable_linears(model)[0]
    x = torch.randn(3, lin.in_features)
    # y = x @ W^T + b must hold for the [out, in] view whatever the module stores
    bias = lin.module.bias if lin.module.bias is not None else torch.zeros(lin.out_features)
    assert torch.allclose(lin.module(x), x @ lin.weight.T + bias, atol=1e-5)
    mask = torch.rand(lin.out_features, lin.in_features) > 0.5
    lin.apply_mask(mask)
    assert (lin.weight[~mask] == 0).all()
    w = torch.randn(lin.out_features, lin.in_features)
    lin.set_weight(w)
    assert torch.equal(lin.weight, w)


def test_model_without_decoder_linears_is_rejected():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(1, 1, 3) for _ in range(2)])

    with pytest.raises(TilesparseError, match="no decoder blocks"):
        find_prunable_linears(NotAnLM())
