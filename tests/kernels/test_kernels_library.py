"""``torch.ops.tilesparse.hybrid_linear``: the operator, its fake implementation, and models with hybrid
layers under ``torch.compile(fullgraph=True)`` on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from kernels_testutil import make_layer  # noqa: F401 (fixture)
from test_kernels_linear import converted_and_masked
from torch import nn

from tilesparse.kernels import HybridLinear
from tilesparse.kernels.library import OP_TENSORS, hybrid_linear_op, op_tensors
from tilesparse.kernels.reference import reference_linear


def _layer(make_layer, bias=True, dtype=torch.float32):
    lin = nn.Linear(200, 100, bias=bias).to(dtype)
    _, mask, _ = make_layer(100, 200, (32, 64), 0.5, 0.2)
    return HybridLinear.from_linear(lin, mask, (32, 64))


def _call(hyb, x, tensors=None):
    return torch.ops.tilesparse.hybrid_linear(x, op_tensors(hyb.packed) if tensors is None else tensors, hyb.bias,
                                              hyb._op_dims, -1)


def test_operator_equals_the_reference_and_passes_opcheck(make_layer):
    hyb = _layer(make_layer)
    x = torch.randn(3, 5, 200)
    assert torch.equal(_call(hyb, x), reference_linear(x, hyb.packed, hyb.bias))
    torch.library.opcheck(hybrid_linear_op, (x, op_tensors(hyb.packed), hyb.bias, hyb._op_dims, -1),
                          test_utils=("test_schema", "test_faketensor"))


def test_each_layer_is_found_from_its_own_tensors(make_layer):
    from tilesparse.kernels import library

    a, b = _layer(make_layer), _layer(make_layer)
    with torch.no_grad():
        b.packed_dn_vals.copy_(torch.randn_like(b.packed_dn_vals))
        b.packed_sp_vals.copy_(torch.randn_like(b.packed_sp_vals))
    x = torch.randn(4, 200)
    assert library._resolve(op_tensors(a.packed), a._op_dims) is a.packed
    assert library._resolve(op_tensors(b.packed), b._op_dims) is b.packed
    assert torch.equal(_call(b, x), reference_linear(x, b.packed, b.bias))
    # a's row tables with b's values (no registered layer holds this mix): a layout is built for these tensors
    mixed = op_tensors(a.packed)
    for name in ("dn_vals", "sp_vals"):
        mixed[OP_TENSORS.index(name)] = getattr(b.packed, name)
    rebuilt = library._resolve(mixed, a._op_dims)
    assert rebuilt is not a.packed and rebuilt is not b.packed and rebuilt.dn_vals is b.packed.dn_vals
    # a copy of the tensors (other storage): same product
    copied = [t.clone() for t in op_tensors(a.packed)]
    assert torch.equal(_call(a, x, copied), a(x))


def test_one_compiled_call_serves_every_layer_of_a_shape(make_layer):
    from torch._dynamo.testing import CompileCounter

    a, b = _layer(make_layer), _layer(make_layer)
    with torch.no_grad():
        b.packed_dn_vals.copy_(torch.randn_like(b.packed_dn_vals))
    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(lambda m, x: m(x), backend=counter, fullgraph=True)
    x = torch.randn(3, 200)
    with torch.no_grad():
        for layer in (a, b, a):
            assert torch.equal(f(layer, x), reference_linear(x, layer.packed, layer.bias))
    assert counter.frame_count == 1  # regional compilation: no recompile per layer


def test_a_copied_layer_has_its_own_view(make_layer):
    from tilesparse.kernels import library

    a = _layer(make_layer)
    b = copy.deepcopy(a)
    assert library._resolve(op_tensors(b.packed), b._op_dims) is b.packed
    assert b.packed.dn_vals is b.packed_dn_vals and b.packed_dn_vals.data_ptr() != a.packed_dn_vals.data_ptr()
    x = torch.randn(3, 200)
    assert torch.equal(_call(b, x), a(x))


def test_fake_implementation_gives_shape_and_checks_input(make_layer):
    from torch._subclasses.fake_tensor import FakeTensorMode

    hyb = _layer(make_layer)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 7, 200))
        y = _call(hyb, x)
        assert y.shape == (2, 7, 100) and y.dtype == torch.float32
        with pytest.raises(ValueError, match="in_features=200"):
            _call(hyb, mode.from_tensor(torch.randn(2, 199)))
    assert len(OP_TENSORS) == len(op_tensors(hyb.packed))


def test_model_compiles_without_graph_breaks():
    model, ref = converted_and_masked()
    ids = torch.randint(0, 128, (2, 12))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda i: model(input_ids=i, use_cache=False).logits)(ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = [n for g in explained.graphs for n in g.graph.nodes if n.target is torch.ops.tilesparse.hybrid_linear.default]
    assert len(ops) == 14  # one operator node per hybrid layer
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=False).logits
        assert torch.equal(out, ref(input_ids=ids, use_cache=False).logits)


def test_model_compiles_with_inductor():
    model, ref = converted_and_masked()
    ids = torch.randint(0, 128, (2, 12))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(out, ref(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)

