"""The TileLang route of column-shared layers (:mod:`tilesparse.kernels.tilelang_columns`) on the CPU:

* which layers it takes, and that its views of the packed tensors (the 2:4 values, the metadata read as TileLang's
  int16 words, the dense columns, the tile-column tables) compute the layer exactly (float64 against the packed
  reference);
* that the dispatcher offers it only on a device that can run it, and that a compiled model's route asks for it;
* both kernels lowered to CUDA for sm_90a by TileLang (skipped without TileLang): 2:4 steps on ``wgmma.sp``, every
  weight and x copy a TMA copy of the producer warps (no x element loaded by the consumers).

On an H100 ``benchmarks/columns_speed.py`` runs the kernels against float64 (every candidate, odd token counts,
all-2:4 layers, an odd count of 2:4 tile-columns, a bias) and times them."""

from __future__ import annotations

import pytest
import torch

from tilesparse.kernels import ops
from tilesparse.kernels import tilelang_columns as tc
from tilesparse.kernels.format import pack, pack_from_kinds
from tilesparse.kernels.reference import reference_linear_f64
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, ZERO


def column_layer(N, K, sparse_cols, dtype=torch.bfloat16, tile=(128, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    C = -(-K // tile[1])
    row = torch.full((C,), DENSE, dtype=torch.int8)
    row[list(sparse_cols)] = SPARSE
    kinds = row.expand(-(-N // tile[0]), C).contiguous()
    w = torch.randn(N, K, generator=g).to(dtype)
    return pack_from_kinds(w, kinds, topk_mask(w.abs().float()), tile)


def test_column_split_accepts_only_uniform_columns():
    k = torch.tensor([[SPARSE, DENSE, SPARSE]] * 3, dtype=torch.int8)
    assert tc.column_split(k) == ([0, 2], [1])
    mixed = k.clone()
    mixed[1, 1] = SPARSE
    assert tc.column_split(mixed) is None
    zero = k.clone()
    zero[:, 1] = ZERO
    assert tc.column_split(zero) is None
    assert tc.column_split(torch.full((2, 2), DENSE, dtype=torch.int8)) is None  # nothing for gemm_sp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,cols,tile", [(256, 1024, [0, 3, 5, 6], (128, 128)), (192, 512, [0, 1, 2, 3], (64, 128)),
                                          (128, 384, [1], (128, 128)), (320, 512, [1, 2], (64, 128))])
def test_layout_views_compute_the_layer(N, K, cols, tile, dtype):
    p = column_layer(N, K, cols, dtype, tile)
    lay = tc.column_layout(p)
    assert lay is not None and lay.n_sp == len(cols) and lay.n_sp + lay.n_dn == K // tile[1]
    assert lay.ws.data_ptr() == p.sp_vals.data_ptr() and lay.wd.data_ptr() == p.dn_vals.data_ptr()  # views
    assert lay.e16.dtype == torch.int16 and tuple(lay.e16.shape) == (N, len(cols) * tile[1] // 16)
    x = torch.randn(37, K, dtype=torch.float64)
    ref = reference_linear_f64(x, p)
    got = tc.reference_columns(x, lay).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_layout_is_cached_and_dropped_with_the_layout():
    p = column_layer(128, 512, [1, 2])
    assert tc.column_layout(p) is tc.column_layout(p)
    lay = tc.column_layout(p)
    p.rebuild_layout()
    assert tc.column_layout(p) is not lay


@pytest.mark.parametrize("case", ["free map", "zero tile", "fp32", "partial tile", "tile 64", "rows"])
def test_layers_it_does_not_take(case):
    g = torch.Generator().manual_seed(1)
    if case == "free map":
        kinds = torch.tensor([[SPARSE, DENSE], [DENSE, SPARSE]], dtype=torch.int8)
        w = torch.randn(256, 256, generator=g).bfloat16()
        p = pack_from_kinds(w, kinds, topk_mask(w.abs().float()), (128, 128))
    elif case == "zero tile":
        w = torch.randn(256, 256, generator=g).bfloat16()
        m = topk_mask(w.abs().float())
        m[:, 128:] = False
        p = pack(w, m)
    elif case == "fp32":
        p = column_layer(128, 256, [0], torch.float32)
    elif case == "partial tile":
        p = column_layer(128, 320, [0])
    elif case == "tile 64":
        p = column_layer(128, 256, [0, 1], tile=(128, 64))
    else:
        p = column_layer(96, 256, [0], tile=(32, 128))
    assert tc.column_layout(p) is None
    assert tc.column_reason(p)


def test_dispatcher_offers_it_only_where_it_runs():
    p = column_layer(256, 1024, [0, 1, 2])
    assert not any(c.path == "columns" for c in ops.candidate_configs(64, p))  # a CPU layer
    cands = ops.column_candidates(64) + ops.column_candidates(16) + ops.column_candidates(2048)
    assert cands and all(c.path == "columns" and c.bm >= 16 for c in cands)
    assert all(ops._fit(c, p) is None for c in cands)  # no CUDA device here / not on the CPU
    c = cands[0]
    assert ops.column_config(c).toks == c.bm and ops.column_config(c).rows == c.bn
    assert "columns" in c.short()


def test_two_column_steps_need_an_even_count():
    odd = tc.column_layout(column_layer(128, 1024, [0, 2, 5]))
    even = tc.column_layout(column_layer(128, 1024, [0, 2, 5, 7]))
    one, two = (tc.ColumnConfig(16, 64, t, 4, 128, False, False) for t in (1, 2))
    assert tc.fits(odd, one) and not tc.fits(odd, two) and tc.fits(even, two)


def test_split_k_needs_one_column_steps_tilelang_dense_and_dense_columns():
    lay = tc.column_layout(column_layer(128, 2048, [0, 1, 2, 3, 4, 5, 6, 7, 9]))  # 9 2:4 columns, 7 dense
    all24 = tc.column_layout(column_layer(128, 2048, list(range(16))))
    split = tc.ColumnConfig(16, 64, 1, 6, 128, False, False, splits=4)
    assert tc.fits(lay, split) and not tc.fits(all24, split)  # no dense kernel to sum the partials
    assert not tc.fits(lay, tc.ColumnConfig(16, 64, 1, 6, 128, False, True, splits=2))  # cuBLAS dense part
    assert not tc.fits(lay, tc.ColumnConfig(16, 64, 2, 6, 128, False, False, splits=2))
    assert not tc.fits(tc.column_layout(column_layer(128, 2048, [0, 1, 2])), split)  # under two steps a range
    assert any(c.splits > 1 for c in tc.candidates(16))
    keys = tc.kernel_params(split, 128, torch.bfloat16)
    assert [k[0] for k in keys] == ["sparse", "dense"] and keys[0][1][-3:] == (4, 1, False) and keys[1][1][-2:] == (4, False)


@pytest.fixture(scope="module")
def tilelang_target():
    tilelang = pytest.importorskip("tilelang", reason="TileLang is not installed (pip install tilesparse[tilelang])")
    from tvm.target import Target

    return tilelang, Target({"kind": "cuda", "arch": "sm_90a"})


@pytest.mark.parametrize("kind,params", [
    ("sparse", (128, 64, 16, 2, 4, 128, "bfloat16", False)),
    ("sparse", (128, 64, 16, 1, 6, 128, "float16", False)),
    ("sparse", (128, 128, 256, 1, 2, 256, "bfloat16", True)),
    ("dense", (128, 64, 16, 4, 128, "bfloat16", False)),
    ("dense", (64, 128, 128, 3, 256, "float16", True)),
])
def test_kernels_lower_for_sm90(tilelang_target, kind, params):
    tilelang, target = tilelang_target
    func = (tc.sparse_func if kind == "sparse" else tc.dense_func)(*params)
    with target:
        src = tilelang.lower(func, target=target).kernel_source
    assert ("wgmma_sp" in src) == (kind == "sparse")
    assert "tma_load(X_desc" in src  # x by TMA from the producer, through the tile-column table
    assert "X[" not in src  # ... and never element by element


@pytest.mark.parametrize("kind,params", [
    ("sparse", (128, 64, 16, 1, 6, 128, "bfloat16", False, 2)),
    ("dense", (128, 64, 16, 6, 128, "bfloat16", False, 4)),
])
def test_split_k_kernels_lower_for_sm90(tilelang_target, kind, params):
    tilelang, target = tilelang_target
    func = (tc.sparse_func if kind == "sparse" else tc.dense_func)(*params)
    with target:
        src = tilelang.lower(func, target=target).kernel_source
    assert "tma_load(X_desc" in src and "X[" not in src
    assert "Part[" in src  # the 2:4 kernel writes fp32 partials, the dense kernel reads them
    if kind == "sparse":
        assert "wgmma_sp" in src and "tma_load(Ws_desc" in src  # a range past the last step: TMA zero-fills
        assert "blockIdx.z" in src and "TC[min(" in src  # ... and its table index is clamped


@pytest.mark.parametrize("splits", [1, 2])
def test_two_blocks_per_sm_bound_the_registers(tilelang_target, splits):
    tilelang, target = tilelang_target
    func = tc.sparse_func(128, 64, 16, 1, 6, 128, "bfloat16", False, splits, 2)
    with target:
        src = tilelang.lower(func, target=target).kernel_source
    assert "__launch_bounds__(256, 2)" in src and "reg_alloc" not in src  # nvcc's registers, no setmaxnreg
    assert "tma_load(X_desc" in src and "X[" not in src


@pytest.mark.parametrize("splits", [1, 2])
def test_dependent_launch_waits_only_before_reading_the_2to4_output(tilelang_target, splits):
    tilelang, target = tilelang_target
    cfg = tc.ColumnConfig(16, 64, 1, 6, 128, False, False, splits=splits, pdl=True)
    (_, sp), (_, dn) = tc.kernel_params(cfg, 128, torch.bfloat16)
    with target:
        sp_src = tilelang.lower(tc.sparse_func(*sp), target=target).kernel_source
        dn_src = tilelang.lower(tc.dense_func(*dn), target=target).kernel_source
    assert "cudaTriggerProgrammaticLaunchCompletion" in sp_src
    body = dn_src[dn_src.index("warpgroup_reg_alloc"):]  # the consumer warps, after the producer's branch
    wait = body.index("cudaGridDependencySynchronize")
    assert body.index("wgmma") < wait  # its own steps run before the wait ...
    read = "Y[" if splits == 1 else "Part["
    assert dn_src.index(read) > dn_src.index("cudaGridDependencySynchronize")  # ... and the 2:4 output after it
    assert dn_src.count("cudaGridDependencySynchronize") == 1


def _kernel_bodies(src: str) -> dict:
    """The ``__global__`` definitions of a lowered program by name, with the names (and the table and its length,
    named per program) made neutral, so that two programs' kernels compare as text."""
    import re

    out = {}
    for part in src.split('extern "C" __global__ ')[1:]:
        if not part.splitlines()[0].rstrip().endswith("{"):
            continue  # a declaration
        name = re.match(r"void (?:__launch_bounds__\([^)]*\) )?(\w+)\(", part).group(1)
        body = re.sub(r"\b(TCs|TCd)\b", "TC", part.replace(name, "KERNEL"))
        out[name] = re.sub(r"\b(nsp|ndn|nsteps)\b", "N", body)
    return out


def _x_descriptor(host: str) -> str:
    """The arguments a lowered host function builds x's TMA descriptor from (box, swizzle, ...)."""
    line = next(ln for ln in host.splitlines() if 'call_packed("__tvm_tensormap_create_tiled", X_desc' in ln)
    return line.strip()


def _host_calls(host: str) -> set:
    """A lowered host function's descriptor builds and kernel launches (grid, threads, shared memory), with the
    kernels, tables and table lengths named neutrally."""
    import re

    out = set()
    for ln in host.splitlines():
        if "call_packed(" in ln and "__tvm_set_device" not in ln:
            ln = re.sub(r'call_packed\("(?!__tvm)\w+"', 'call_packed("K"', ln.strip())
            out.add(re.sub(r"\b(nsp|ndn|nsteps)\b", "N", re.sub(r"\b(TCs|TCd)\b", "TC", ln)))
    return out


_PAIRED = ([tc.ColumnConfig(16, 64, 1, 6, 128, False, False, splits=z, blocks_per_sm=1 + d, pdl=d)
            for z, d in ((1, False), (2, False), (1, True), (2, True))]
           + [c for M in (128, 2048) for c in tc.candidates(M) if not c.dense_cublas])  # every TileLang-dense shape


@pytest.mark.parametrize("cfg", _PAIRED, ids=lambda c: f"t{c.toks}r{c.rows}s{c.splits}o{c.blocks_per_sm}p{int(c.pdl)}")
def test_pair_program_is_both_kernels_in_one_call(tilelang_target, cfg):
    tilelang, target = tilelang_target
    pdl = cfg.pdl
    (kind, (sp, dn)), = tc.launch_keys(cfg, 128, torch.bfloat16)
    assert kind == "pair"
    with target:
        art = tilelang.lower(tc.pair_func(sp, dn), target=target)
        lowered = [tilelang.lower(f, target=target) for f in (tc.sparse_func(*sp), tc.dense_func(*dn))]
    alone = [a.kernel_source for a in lowered]
    got = _kernel_bodies(art.kernel_source)
    assert len(got) == 2
    first, second = sorted(got, key=len)  # "<name>_kernel", then "<name>_kernel_1"
    assert got[first] == _kernel_bodies(alone[0])[next(iter(_kernel_bodies(alone[0])))]
    want_dn = next(iter(_kernel_bodies(alone[1]).values()))
    # the dense kernel is the same but for the x descriptor's prefetch: both kernels share that descriptor
    assert got[second] == want_dn.replace("    tl::prefetch_tma_descriptor(X_desc);\n", "")
    host = str(art.host_mod)
    assert host.index(f'call_packed("{first}"') < host.index(f'call_packed("{second}"')  # in order, one call
    assert host.count('call_packed("__tvm_tensormap_create_tiled", X_desc') == 1  # built once per call ...
    assert {_x_descriptor(str(a.host_mod)) for a in lowered} == {_x_descriptor(host)}  # ... as each kernel wants it
    # every descriptor and launch (grid, threads, shared memory) is the two programs' own
    assert _host_calls(host) == _host_calls(str(lowered[0].host_mod)) | _host_calls(str(lowered[1].host_mod))
    flags = {gv.name_hint: dict(f.attrs) for gv, f in art.device_mod.functions.items()}
    assert ("has_cuda_pdl_trigger" in flags[first]) == pdl and ("has_cuda_pdl_sync" in flags[second]) == pdl


def test_pair_program_refuses_unequal_ranges():
    cfg = tc.ColumnConfig(16, 64, 1, 6, 128, False, False, splits=2)
    (_, sp), (_, dn) = tc.kernel_params(cfg, 128, torch.bfloat16)
    pytest.importorskip("tilelang", reason="TileLang is not installed (pip install tilesparse[tilelang])")
    with pytest.raises(ValueError, match="2 ranges"):
        tc.pair_func(sp, dn[:7] + (1,) + dn[8:])


def test_launch_keys_one_program_per_layer():
    tl_dense = tc.ColumnConfig(16, 64, 1, 6, 128, False, False)
    cublas = tc.ColumnConfig(128, 128, 1, 3, 256, True, True)
    (_, sp), (_, dn) = tc.kernel_params(tl_dense, 128, torch.float16)
    assert tc.launch_keys(tl_dense, 128, torch.float16) == [("pair", (sp, dn))]
    assert tc.launch_keys(tl_dense, 128, torch.float16, has_dense=False) == [("sparse", sp)]
    assert tc.launch_keys(cublas, 128, torch.float16) == tc.kernel_params(cublas, 128, torch.float16)


def test_compiled_route_on_the_cpu_is_not_columns():
    from tilesparse.kernels.linear import HybridLinear

    p = column_layer(128, 256, [0])
    assert HybridLinear._route_in_graph(p) in (None, "unpack")
