"""Shared fixtures of the kernel tests (imported by name from each test module; a module of its own, not
a ``conftest.py``, so it never shadows ``tests/conftest.py`` for other test directories).

The kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set by ``tests/conftest.py``
on a machine without a GPU before triton is first imported). If the kernel module was imported before
the variable took effect, the ``interp`` fixture reloads it.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch


def interpreter_ready() -> bool:
    """True when triton is (or will be) imported in interpreter mode in this process."""
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET") == "1"
    import triton.language as tl

    return type(tl.cdiv).__name__ == "InterpretedFunction"


@pytest.fixture(scope="session")
def interp():
    """The interpreted kernel module (skips when triton is not installed)."""
    pytest.importorskip("triton")
    if not interpreter_ready():
        pytest.skip("interpreted kernels: a GPU machine runs the kernels themselves (TRITON_INTERPRET is not 1)")
    os.environ["TRITON_INTERPRET"] = "1"
    from tilesparse.kernels import triton_hybrid

    if type(triton_hybrid.unpack_kernel).__name__ != "InterpretedFunction":
        triton_hybrid = importlib.reload(triton_hybrid)
    return triton_hybrid


def graph_ops(fn, *args) -> tuple[list, object]:
    """The ``tilesparse`` operators in the graph ``torch.compile(fullgraph=True)`` makes of ``fn``, and its output."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if "tilesparse" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return seen, out


def random_kinds(grid, frac_sparse: float, frac_zero: float, g: torch.Generator) -> torch.Tensor:
    """A tile map with ``frac_sparse`` of the tiles 2:4 and ``frac_zero`` all-zero at random places, the rest
    dense (int8 ``[rows, cols]`` of the grid)."""
    from tilesparse.masks.tiles import DENSE, SPARSE, ZERO

    n = grid.n_rows * grid.n_cols
    perm = torch.randperm(n, generator=g)
    kinds = torch.full((n,), DENSE, dtype=torch.int8)
    ns, nz = round(frac_sparse * n), round(frac_zero * n)
    kinds[perm[:ns]] = SPARSE
    kinds[perm[ns:ns + nz]] = ZERO
    return kinds.reshape(grid.shape)


def random_layer(N, K, tile, frac_sparse, frac_zero=0.0, dtype=torch.bfloat16, seed=0):
    """A random weight, a hybrid keep-mask with the given tile fractions, and its packed form."""
    from tilesparse.kernels.format import pack
    from tilesparse.masks.nm import topk_mask
    from tilesparse.masks.tiles import TileGrid, hybrid_mask

    g = torch.Generator().manual_seed(seed)
    grid = TileGrid(N, K, *tile)
    kinds = random_kinds(grid, frac_sparse, frac_zero, g)
    W = torch.randn(N, K, generator=g).to(dtype)
    mask = hybrid_mask(kinds, topk_mask(torch.rand(N, K, generator=g)), grid)
    return W, mask, pack(W, mask, tile)


@pytest.fixture
def make_layer():
    """Factory fixture: ``make_layer(N, K, tile, frac_sparse, frac_zero=0, dtype=bf16, seed=0)``."""
    return random_layer


def run_poisoned(launch, x, p, bias, cfg):
    """``launch(x, p, bias, cfg, out)`` into an output pre-filled with NaN (so unwritten entries show)."""
    out = torch.full((x.shape[0], p.out_features), float("nan"), dtype=x.dtype)
    launch(x, p, bias, cfg, out)
    return out


def check_config(launch, x, p, bias, cfg, tol=1e-2):
    """Fit ``cfg`` to the layer, launch it and compare with the float64 reference; returns the output."""
    from tilesparse.kernels import ops
    from tilesparse.kernels.reference import reference_linear_f64, rel_error

    f = ops._fit(cfg, p)
    assert f is not None, cfg.short()
    a = run_poisoned(launch, x, p, bias, f)
    err = rel_error(a, reference_linear_f64(x, p, bias))
    assert err < tol, f"M={x.shape[0]} {f.short()} bias={bias is not None}: rel err {err:.3e}"
    return a


def check_configs(check, p, cfgs, dtype):
    """``check(x, p, bias, cfg)`` for every ``(M, cfg)`` on fresh random ``x``, with a bias every other time."""
    bias = torch.randn(p.out_features).to(dtype)
    for i, (M, cfg) in enumerate(cfgs):
        check(torch.randn(M, p.in_features).to(dtype), p, bias if i % 2 == 0 else None, cfg)


def row_kinds_outputs(check, p, cfgs, dtype):
    """On a :func:`rows_layer`: ``check`` every ``(M, cfg)`` with and without bias and assert that the all-zero
    tile-row (rows 64-95) holds the bias alone; yields ``(cfg, x, bias, y)`` for further checks."""
    bias = torch.randn(p.out_features).to(dtype)
    zero_rows = slice(64, 96)
    for M, cfg in cfgs:
        for b in (bias, None):
            x = torch.randn(M, p.in_features).to(dtype)
            y = check(x, p, b, cfg)
            expect = torch.zeros_like(y[:, zero_rows]) if b is None else b[zero_rows].expand_as(y[:, zero_rows])
            assert torch.equal(y[:, zero_rows], expect)
            yield cfg, x, b, y


def rows_layer(dtype, tile=(32, 32), seed=5):
    """4 tile-rows: all dense, all 2:4, all zero (rows 64-95 for 32-row tiles), mixed (with a zero tile);
    K=160 -> 5 tile columns; the last tile-row is partial."""
    from tilesparse.kernels.format import pack_from_kinds
    from tilesparse.masks.nm import topk_mask
    from tilesparse.masks.tiles import DENSE, SPARSE, ZERO

    N, K = 4 * tile[0] - 8, 160
    kinds = torch.tensor([[DENSE] * 5, [SPARSE] * 5, [ZERO] * 5, [SPARSE, ZERO, DENSE, SPARSE, DENSE]],
                         dtype=torch.int8)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g).to(dtype)
    return pack_from_kinds(W, kinds, topk_mask(torch.rand(N, K, generator=g)), tile)


CASES = [  # N, K, tile, frac_sparse, frac_zero
    (100, 200, (32, 64), 0.5, 0.2),   # partial edge tiles both ways, all three kinds
    (64, 96, (16, 32), 1.0, 0.0),     # only 2:4 tiles
    (48, 64, (16, 32), 0.0, 0.3),     # only dense (+ zero) tiles
    (72, 52, (16, 32), 0.5, 0.0),     # edge tile with an odd number of groups
]


def case_id(c) -> str:
    """Test id of a :data:`CASES` entry."""
    return f"{c[0]}x{c[1]}-t{c[2][0]}x{c[2][1]}-s{c[3]}-z{c[4]}"


def q4_layer(N, K, tile, group, kinds=None, frac_sparse=0.4, frac_zero=0.2, seed=0):
    """A random weight quantized (RTN, asymmetric) under a random hybrid mask (or the tile map ``kinds``) and
    packed in the 4-bit format."""
    from tilesparse.kernels.format_q4 import pack_q4
    from tilesparse.masks.nm import topk_mask
    from tilesparse.masks.tiles import SPARSE, TileGrid, hybrid_mask
    from tilesparse.quant import quantize_rtn

    g = torch.Generator().manual_seed(seed)
    grid = TileGrid(N, K, *tile)
    if kinds is None:
        kinds = random_kinds(grid, frac_sparse, frac_zero, g)
    W = torch.randn(N, K, generator=g)
    m24 = topk_mask(W.abs()) if bool((kinds == SPARSE).any()) else None
    keep = hybrid_mask(kinds, torch.ones(N, K, dtype=torch.bool) if m24 is None else m24, grid)
    q = quantize_rtn(W, keep, group_size=group, symmetric=False)
    return pack_q4(q.quantized, kinds, m24, tile)


def mma_ptx(key, arch: str) -> str:
    """NVRTC's PTX of an mma kernel configuration for ``arch`` (skips without ``cuda-bindings`` / NVRTC), after
    checking that it defines the kernel and runs both MMAs (``mma.sp`` for 2:4 steps, ``mma`` for dense ones) on
    the configuration's 16-bit type with fp32 accumulators."""
    from tilesparse.kernels import cuda_driver

    if cuda_driver.missing():
        pytest.skip(cuda_driver.missing())
    ptx = cuda_driver.compile_source(key.configured_source(), key.name, arch).rstrip(b"\0").decode()
    assert f".entry {key.name}(" in ptx
    t = "bf16" if key.bf16 else "f16"
    lines = ptx.splitlines()
    sparse = [ln for ln in lines if "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col" in ln]
    dense = [ln for ln in lines if "mma.sync.aligned.m16n8k16.row.col" in ln]
    assert sparse and dense and all(f".f32.{t}.{t}.f32" in ln for ln in sparse + dense)
    return ptx


def assert_no_spills_sm90(key) -> None:
    """ptxas reports no register spills for the configuration on sm_90 (skips without NVRTC)."""
    from tilesparse.kernels import cuda_driver

    if cuda_driver.missing():
        pytest.skip(cuda_driver.missing())
    log = []
    cuda_driver.compile_source(key.configured_source(), key.name, "sm_90", ("-std=c++17", "--ptxas-options=-v"),
                               log=log)
    assert "0 bytes spill stores, 0 bytes spill loads" in log[0], log[0]
