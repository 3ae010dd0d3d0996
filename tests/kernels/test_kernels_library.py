"""``torch.ops.tilesparse.hybrid_linear``: the operator, its fake implementation, and models with hybrid
layers under ``torch.compile(fullgraph=True)`` on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from kernels_testutil import graph_ops, make_layer  # noqa: F401 (fixture)
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


def test_unpack_operator_writes_the_masked_weight(make_layer):
    from tilesparse.kernels.library import hybrid_unpack_op

    for N, K, tile, fs, fz in [(200, 96, (16, 16), 0.5, 0.2), (130, 200, (32, 64), 0.5, 0.2), (256, 256, (128, 128), 1.0, 0)]:
        _, _, p = make_layer(N, K, tile, fs, fz)
        assert torch.equal(hybrid_unpack_op(op_tensors(p), [N, K, *tile]), p.unpack())


def test_compiled_forward_unpacks_in_the_graph_above_64_tokens(make_layer, monkeypatch):
    """By default (TILESPARSE_COMPILED_UNPACK=1), above UNPACK_ABOVE tokens a compiled layer is the unpack operator +
    F.linear (the compiler launches both); at fewer tokens, for layers the Triton kernels do not take, and with
    the switch off, it stays one hybrid_linear node."""
    from tilesparse.kernels.ops import UNPACK_ABOVE

    W, mask, _ = make_layer(100, 200, (32, 64), 0.5, 0.2)
    lin = nn.Linear(200, 100).to(torch.bfloat16)
    lin.weight.data.copy_(W)
    monkeypatch.setenv("TILESPARSE_COMPILED_UNPACK", "0")
    off = HybridLinear.from_linear(lin, mask, (32, 64), use_triton=True)
    with torch.no_grad():
        assert graph_ops(off, torch.randn(UNPACK_ABOVE + 16, 200).to(torch.bfloat16))[0] == \
            ["tilesparse.hybrid_linear.default"]
    monkeypatch.setenv("TILESPARSE_COMPILED_UNPACK", "1")
    hyb = HybridLinear.from_linear(lin, mask, (32, 64), use_triton=True)  # the kernels, under the interpreter
    with torch.no_grad():
        for tokens, want in [(UNPACK_ABOVE + 16, ["tilesparse.hybrid_unpack.default"]),
                             (16, ["tilesparse.hybrid_linear.default"])]:
            x = torch.randn(tokens, 200).to(torch.bfloat16)
            seen, out = graph_ops(hyb, x)
            assert seen == want, tokens
            torch.testing.assert_close(out, reference_linear(x, hyb.packed, hyb.bias), rtol=1e-2, atol=1e-2)
        x = torch.randn(UNPACK_ABOVE + 16, 200).to(torch.bfloat16)  # through AOT autograd, shapes dynamic
        torch._dynamo.reset()
        out = torch.compile(hyb, fullgraph=True, backend="aot_eager", dynamic=True)(x)
        torch.testing.assert_close(out, reference_linear(x, hyb.packed, hyb.bias), rtol=1e-2, atol=1e-2)
        fp32 = HybridLinear.from_linear(nn.Linear(200, 100), mask, (32, 64))  # no kernel takes 32-bit weights
        assert fp32._graph_route is None
        seen, _ = graph_ops(fp32, torch.randn(UNPACK_ABOVE + 16, 200))
        assert seen == ["tilesparse.hybrid_linear.default"]


def test_compiled_all_dense_layer_is_a_plain_linear():
    lin = nn.Linear(256, 128).to(torch.bfloat16)
    hyb = HybridLinear.from_linear(lin, torch.ones(128, 256, dtype=torch.bool), (64, 64), use_triton=True)
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        seen, out = graph_ops(hyb, x)
        assert seen == []
        assert torch.equal(out, lin(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor launching the unpack kernel)")
def test_compiled_model_on_the_gpu_equals_eager_at_prefill_and_decode(monkeypatch):
    """Inductor compiles the unpack operator's kernel into the graph (prefill) and keeps the hybrid operator
    (decode); both agree with the eager layers."""
    monkeypatch.setenv("TILESPARSE_COMPILED_UNPACK", "1")
    model, _ = converted_and_masked()
    model = model.to(device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for tokens in (100, 3):  # (2 sequences: 200 and 6 tokens per layer call)
            ids = torch.randint(0, 128, (2, tokens), device="cuda")
            want = model(input_ids=ids, use_cache=False).logits.float()
            got = compiled(input_ids=ids, use_cache=False).logits.float()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
