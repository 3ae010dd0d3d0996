"""4-bit decode kernel (``hybrid_q4_kernel``) vs the float64 product on the dequantized weight, on the CPU through
TRITON_INTERPRET=1 (small shapes); its launcher's checks; the 4-bit product's dispatch."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernels_testutil import interp, q4_layer  # noqa: F401 (fixture)

from tilesparse.kernels.format_q4 import unpack_q4
from tilesparse.kernels.reference import rel_error
from tilesparse.masks.tiles import DENSE, SPARSE, ZERO

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def q4(interp):
    """The interpreted :mod:`tilesparse.kernels.triton_q4`."""
    from tilesparse.kernels import triton_q4

    if type(triton_q4.hybrid_q4_kernel).__name__ != "InterpretedFunction":
        triton_q4 = importlib.reload(triton_q4)
    return triton_q4


def rows_q4_layer(group=32):
    """4 tile-rows of 32: all dense, all 2:4, all zero (rows 64-95), mixed with a zero tile; the last one partial."""
    kinds = torch.tensor([[DENSE] * 5, [SPARSE] * 5, [ZERO] * 5, [SPARSE, ZERO, DENSE, SPARSE, DENSE]],
                         dtype=torch.int8)
    return q4_layer(120, 160, (32, 32), group, kinds=kinds, seed=5)


def reference(x, p, bias):
    """``x @ W^T (+ bias)`` in float64 on the dequantized weight."""
    y = x.double() @ unpack_q4(p).double().T
    return y if bias is None else y + bias.double()


def check(q4, p, M, dtype=torch.float32, bias=True, seed=0, **cfg):
    """Run the kernel on fresh random ``x [M, in]`` (and bias) and compare with :func:`reference`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, p.in_features, generator=g).to(dtype)
    b = torch.randn(p.out_features, generator=g).to(dtype) if bias else None
    y = q4.q4_linear_triton(x, p, b, **cfg)
    assert y.shape == (M, p.out_features) and y.dtype == dtype
    err = rel_error(y, reference(x, p, b))
    assert err < TOL[dtype], f"M={M} {dtype} bias={bias} {cfg}: rel err {err:.3e}"
    return x, b, y


@pytest.mark.parametrize("group", [128, 32, 48], ids=["group128-per-tile", "group32-per-weight",
                                                      "group48-per-weight-across-tiles"])
def test_mixed_tiles_partial_edges_and_group_sizes(q4, group):
    """Dense, 2:4 and all-zero tiles; 72 rows (a partial tile-row) x 200 columns (a partial edge tile of 8 and
    a partial last group); group 128 takes one scale per tile, 32 and 48 one per weight."""
    p = q4_layer(72, 200, (16, 64), group, seed=group)
    assert (group % p.tile_cols == 0) == (group == 128)
    for i, M in enumerate((1, 3, 16)):
        check(q4, p, M, bias=i % 2 == 0, seed=i)
        check(q4, p, M, bias=i % 2 == 1, seed=i + 10)


def test_odd_width_dense_layer(q4):
    """Dense and zero tiles only, 83 columns: the last code byte of a row holds one weight."""
    p = q4_layer(40, 83, (16, 32), 48, frac_sparse=0.0, frac_zero=0.3, seed=4)
    assert int(p.row_info[:, 5].max()) % 2 == 1  # an odd dense K-space
    for M in (1, 3):
        check(q4, p, M, seed=M)


CONFIGS = [  # (tokens, launcher keywords)
    (1, {}),
    (1, {"bn": 16, "ts": 1, "td": 1, "pref": True}),  # separate 2:4 and dense accumulators
    (1, {"bn": 4, "ts": 2, "td": 1, "split": 3}),  # split-K over 3 programs
    (3, {"bn": 8, "split": 2, "pref": False}),
    (16, {"dot": False}),
    (16, {"dot": False, "bn": 32, "ts": 2, "td": 2}),
    (16, {}),  # tensor cores
    (9, {"dot": True, "split": 2, "pref": False}),
]


@pytest.mark.parametrize("M,cfg", CONFIGS, ids=[f"M{m}-{'-'.join(f'{k}{v}' for k, v in c.items())}"
                                                 for m, c in CONFIGS])
def test_row_kinds_and_configs(q4, M, cfg):
    """All-dense, all-2:4, all-zero and mixed tile-rows: the all-zero tile-row holds the bias alone (or zeros);
    a split launch leaves its arrival counters at zero, so it repeats exactly."""
    p = rows_q4_layer()
    for bias in (True, False):
        x, b, y = check(q4, p, M, bias=bias, seed=M, **cfg)
        expect = b[64:96].expand(M, 32) if bias else torch.zeros(M, 32)
        assert torch.equal(y[:, 64:96], expect)
    if cfg.get("split", 1) > 1:
        assert torch.equal(q4.q4_linear_triton(x, p, b, **cfg), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs(q4, dtype):
    p = q4_layer(72, 200, (32, 64), 128, seed=7)
    for i, (M, cfg) in enumerate([(1, {}), (3, {}), (16, {"dot": False}), (16, {"dot": True})]):
        check(q4, p, M, dtype, bias=i % 2 == 0, seed=i, **cfg)


def test_default_configs(q4):
    """FMA for 1-4 tokens; tensor cores above where the tiles allow 32-row blocks; every default runs."""
    p16, p32 = q4_layer(32, 64, (16, 32), 32, seed=1), rows_q4_layer()
    assert [q4.default_q4_config(M, p32)["dot"] for M in (1, 4, 5, 16)] == [False, False, True, True]
    assert not q4.default_q4_config(16, p16)["dot"]
    assert q4.default_q4_config(16, p32, dot=False)["bm"] == 16
    for M in (1, 2, 5, 16):
        check(q4, p16, M, seed=M)


def test_bad_input_is_a_one_line_error(q4):
    p = q4_layer(32, 64, (16, 32), 32, seed=2)
    x = torch.randn(2, 64)
    cases = [
        (ValueError, "in_features=64", (torch.randn(2, 63), p, None), {}),
        (ValueError, "in_features=64", (torch.randn(64), p, None), {}),
        (TypeError, "does not match", (x, p, torch.randn(32).half()), {}),
        (TypeError, "bfloat16, float16 or float32", (x.double(), p, None), {}),
        (ValueError, r"1\.\.16 tokens", (torch.randn(17, 64), p, None), {}),
        (ValueError, "bias must be", (x, p, torch.randn(31)), {}),
        (ValueError, "bm must be", (x, p, None), {"bm": 1}),
        (ValueError, "tensor cores", (x, p, None), {"dot": True}),  # 16-row tiles: no 32-row blocks
    ]
    for exc, match, args, kw in cases:
        with pytest.raises(exc, match=match) as info:
            q4.q4_linear_triton(*args, **kw)
        assert "\n" not in str(info.value)


def test_dispatch(q4):
    """``q4_linear`` forced onto the kernel (leading dimensions, a bias in another dtype) matches the reference;
    left to choose on the CPU it is the torch reference; the operator has a CUDA implementation."""
    from tilesparse.kernels.library import _q4_reference, q4_kernel_applies, q4_linear

    p = q4_layer(72, 200, (16, 64), 48, seed=9)
    x = torch.randn(2, 3, 200).bfloat16()
    bias = torch.randn(72)
    y = q4_linear(x, p, bias, use_triton=True)
    assert y.shape == (2, 3, 72) and y.dtype == torch.bfloat16
    assert rel_error(y, reference(x.reshape(6, 200), p, bias.bfloat16()).reshape(2, 3, 72)) < 1e-2
    assert not q4_kernel_applies(x, p)
    assert torch.equal(q4_linear(x, p, bias), _q4_reference(x, p, bias))
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tilesparse::hybrid_linear_q4", "CUDA")


def test_a_kernel_that_fails_on_the_machine_falls_back_to_the_reference_once(monkeypatch):
    """A Triton kernel that cannot compile or launch here (not the caller's operands) is said once, and 4-bit
    layers run the torch reference from then on; a forced kernel call still raises, and so do bad operands."""
    from tilesparse.kernels import library

    p = q4_layer(48, 64, (16, 32), 32, seed=4)
    x = torch.randn(3, 64).bfloat16()
    calls = []

    def broken(x2, packed, bias):
        calls.append(1)
        raise RuntimeError("PassManager::run failed\nmore lines")

    monkeypatch.setattr(library, "_q4_triton_launcher", lambda: broken)
    monkeypatch.setattr(library, "q4_kernel_applies", lambda x, p: True)
    monkeypatch.setattr(library, "_Q4_TRITON_FAILED", [None])
    with pytest.raises(RuntimeError, match="PassManager"):
        library.q4_linear(x, p, use_triton=True)
    with pytest.warns(RuntimeWarning, match=r"4-bit Triton kernel failed on this machine \(RuntimeError: PassManager::run failed\)"):
        y = library.q4_linear(x, p)
    assert torch.equal(y, library._q4_reference(x, p, None)) and len(calls) == 2
    assert torch.equal(library.q4_linear(x, p), y) and len(calls) == 2  # not tried again

    def bad_operands(x2, packed, bias):
        raise ValueError("q4 kernel: x must be [tokens, in_features=64]")

    monkeypatch.setattr(library, "_q4_triton_launcher", lambda: bad_operands)
    monkeypatch.setattr(library, "_Q4_TRITON_FAILED", [None])
    with pytest.raises(ValueError, match="in_features=64"):
        library.q4_linear(x, p)


def test_operator_finds_the_module_layer():
    """A ``HybridLinearQ4``'s tensors resolve to its registered layer (no layout rebuilt per call); other tensors
    or dimensions get a layer of their own."""
    from tilesparse.kernels.library import _resolve_q4
    from tilesparse.kernels.linear_q4 import HybridLinearQ4

    p = q4_layer(48, 64, (16, 32), 32, seed=3)
    layer = HybridLinearQ4(p)
    assert _resolve_q4(layer._tensors(), layer._dims) is layer.packed
    copied = [t.clone() for t in layer._tensors()]
    other = _resolve_q4(copied, layer._dims)
    assert other is not layer.packed and other.scales is copied[p.STORED.index("scales")]
    with pytest.raises(ValueError, match="scales holds"):  # other dimensions: not the layer's, and checked
        _resolve_q4(layer._tensors(), [*layer._dims[:4], 16])


UNPACK_LAYERS = [  # (name, layer)
    ("row-kinds-group32", lambda: rows_q4_layer(32)),
    ("mixed-partial-group48", lambda: q4_layer(72, 200, (16, 64), 48, seed=11)),
    ("mixed-group128", lambda: q4_layer(64, 256, (32, 128), 128, seed=12)),
    ("odd-width-dense", lambda: q4_layer(40, 83, (16, 32), 48, frac_sparse=0.0, frac_zero=0.3, seed=4)),
    ("groups-across-chunks", lambda: q4_layer(48, 256, (16, 128), 100, seed=13)),
]


@pytest.mark.parametrize("make", [m for _, m in UNPACK_LAYERS], ids=[n for n, _ in UNPACK_LAYERS])
def test_unpack_kernel_equals_the_dequantized_weight(q4, make):
    """``unpack_q4_kernel`` writes exactly :func:`unpack_q4` in float32 (a 4-bit code times a bfloat16 scale is
    exact), and that weight within one bfloat16 step (the interpreter truncates where the GPU rounds); pruned
    positions and all-zero tiles are 0."""
    p = make()
    ref = unpack_q4(p)
    assert torch.equal(q4.unpack_q4_triton(p, dtype=torch.float32), ref)
    out = torch.full((p.out_features, p.in_features), 7.0, dtype=torch.bfloat16)
    assert q4.unpack_q4_triton(p, out) is out
    assert bool(((out.float() - ref).abs() <= ref.abs() * 2.0 ** -7).all()) and torch.equal(out == 0, ref == 0)
    with pytest.raises(ValueError, match="contiguous"):
        q4.unpack_q4_triton(p, torch.empty(p.in_features, p.out_features).T)


@pytest.mark.parametrize(("tile", "group", "bk", "one_group"), [
    ((32, 128), 128, 128, True), ((32, 128), 32, 32, True), ((16, 64), 48, 16, True), ((32, 128), 256, 128, True),
    ((32, 128), 100, 128, False), ((16, 96), 64, 32, True)])
def test_unpack_block_width_follows_the_group(q4, tile, group, bk, one_group):
    """The unpack launch's default chunk width: up to 128 columns, narrowed to divide the group size where that
    keeps at least 8 (one scale and zero point per row and chunk); otherwise per-element parameters."""
    consts = q4.unpack_q4_launch(None, dict.fromkeys(q4.UNPACK_TENSORS), 64, 512, *tile, group)[2]
    assert (consts["BK"], consts["ONE_GROUP"]) == (bk, one_group)


def test_prefill_dispatch_runs_the_unpack_kernel(q4, monkeypatch):
    """More than 16 tokens on a kernel-ready input: ``q4_linear`` is ``F.linear`` on the unpacked weight (equal to
    the float64 reference); 16 tokens stay on the decode kernels; a kernel that fails here falls back to the
    reference once."""
    from tilesparse.kernels import library

    p = q4_layer(72, 200, (16, 64), 48, seed=13)
    monkeypatch.setattr(library, "_x_fits_kernel", lambda x, p: True)
    monkeypatch.setattr(library, "q4_mma_applies", lambda x, p: False)
    monkeypatch.setattr(library, "_Q4_TRITON_FAILED", [None])
    x = torch.randn(3, 7, 200).bfloat16()
    bias = torch.randn(72)
    assert library.q4_unpack_applies(x, p) and not library.q4_unpack_applies(x[0, :2], p)
    y = library.q4_linear(x, p, bias)
    assert y.shape == (3, 7, 72) and y.dtype == torch.bfloat16
    assert rel_error(y, reference(x.reshape(21, 200), p, bias.bfloat16()).reshape(3, 7, 72)) < 1e-2

    def broken(packed, out):
        raise RuntimeError("out of resources: shared memory\nmore")

    monkeypatch.setattr(q4, "unpack_q4_triton", broken)
    with pytest.warns(RuntimeWarning, match="out of resources"):
        y = library.q4_linear(x, p, bias)
    assert torch.equal(y, library._q4_reference(x, p, bias))
    assert not library.q4_unpack_applies(x, p)  # said once, not tried again



def test_both_prefill_routes_refuse_tile_widths_the_unpack_kernel_cannot_chunk(q4, monkeypatch):
    """Tiles 12 wide have no power-of-two chunk of 8 columns or more: the eager dispatcher and the compiled layer
    both keep such a layer off the unpack kernel; 16 wide is taken by both."""
    from tilesparse.kernels import library
    from tilesparse.kernels.linear_q4 import HybridLinearQ4

    monkeypatch.setattr(library, "_x_fits_kernel", lambda x, p: True)
    monkeypatch.setattr(library, "_Q4_TRITON_FAILED", [None])
    monkeypatch.setenv("TILESPARSE_COMPILED_UNPACK", "1")
    x = torch.randn(20, 96).bfloat16()
    for width, takes in ((12, False), (16, True)):
        p = q4_layer(32, 96, (16, width), 48, seed=3)
        assert library.q4_unpack_applies(x, p) is takes
        assert HybridLinearQ4(p)._unpack_in_graph is takes


def test_compiled_layer_unpacks_in_the_graph_above_16_tokens(q4, monkeypatch):
    """By default, a compiled ``HybridLinearQ4`` given more than 16 tokens is ``F.linear`` on the
    ``hybrid_unpack_q4`` operator (the compiler launches its kernel), equal to the float64 reference, also through
    AOT autograd with dynamic shapes; 16 tokens and the switch off keep the ``hybrid_linear_q4`` operator. The
    layout tables the operator reads are not part of the state dict."""
    from kernels_testutil import graph_ops

    from tilesparse.kernels.linear_q4 import HybridLinearQ4

    p = q4_layer(72, 256, (32, 128), 128, seed=21)
    bias = torch.randn(72)
    monkeypatch.setenv("TILESPARSE_COMPILED_UNPACK", "0")
    off = HybridLinearQ4(p, bias)
    monkeypatch.setenv("TILESPARSE_COMPILED_UNPACK", "1")
    layer = HybridLinearQ4(p, bias)
    x = torch.randn(2, 10, 256).bfloat16()  # 20 tokens
    want = reference(x.reshape(20, 256), p, bias.bfloat16()).reshape(2, 10, 72)
    with torch.no_grad():
        seen, out = graph_ops(layer, x)
        assert seen == ["tilesparse.hybrid_unpack_q4.default"]
        assert rel_error(out, want) < 1e-2
        assert graph_ops(layer, x[:, :8])[0] == ["tilesparse.hybrid_linear_q4.default"]  # 16 tokens
        assert graph_ops(off, x)[0] == ["tilesparse.hybrid_linear_q4.default"]
        torch._dynamo.reset()
        out = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)(x)
        assert rel_error(out, want) < 1e-2
    assert set(layer.state_dict()) == set(off.state_dict()) and "packed_row_info" not in layer.state_dict()
    assert torch.equal(layer.packed_q4_info, layer.packed.q4_info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor launching the unpack kernel)")
def test_compiled_4bit_layer_on_the_gpu_equals_eager_at_prefill_and_decode():
    """Inductor compiles ``hybrid_unpack_q4``'s kernel into the graph (100 tokens) and keeps the 4-bit operator
    (3 tokens); both agree with the float64 reference."""
    from tilesparse.kernels.linear_q4 import HybridLinearQ4

    p = q4_layer(256, 512, (128, 128), 128, seed=22).to("cuda")
    layer = HybridLinearQ4(p, torch.randn(256, device="cuda"))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for tokens in (100, 3):
            x = torch.randn(tokens, 512, device="cuda").bfloat16()
            want = reference(x, p, layer.bias.bfloat16())
            assert rel_error(compiled(x), want) < 1e-2 and rel_error(layer(x), want) < 1e-2
