"""v7 / v9 sparse-tensor-core kernels (:mod:`tilesparse.kernels.cuda_mma`, CUDA C++ through NVRTC).

On the CPU: the configuration logic, and the CUDA source compiled to PTX for sm_90 by the library's own NVRTC
call (``cuda-bindings`` and ``nvidia-cuda-nvrtc`` of the dev extras; skipped without them). The kernel's results are checked on a GPU:
here when one is present, and by ``benchmarks/kernel_speed.py --check --mma-only`` (``benchmarks/mma_probe.py``
checks the fragment and metadata layouts the kernel relies on)."""

from __future__ import annotations

import pytest
import torch

from kernels_testutil import random_layer

from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import ops
from tilesparse.kernels.ops import KernelConfig as C
from tilesparse.kernels.reference import reference_linear_f64, rel_error

KEYS = [cm.MmaKey(True, 1, 4, 2, True), cm.MmaKey(True, 2, 8, 2, False), cm.MmaKey(False, 8, 4, 1, True),
        cm.MmaKey(True, 4, 4, 1, False), cm.MmaKey(True, 2, 4, 1, False, 9, 4, nst=5),
        cm.MmaKey(False, 1, 8, 1, True, 9, 2, nst=5), cm.MmaKey(True, 8, 4, 1, True, 9, 8, nst=2),
        cm.MmaKey(True, 2, 4, 1, False, 9, 4, probe=True, nst=2)]


def _ptx(key) -> str:
    from tilesparse.kernels import cuda_driver

    if cuda_driver.missing():
        pytest.skip(cuda_driver.missing())
    return cuda_driver.compile_source(cm.configured_source(key), key.name, "compute_90").rstrip(b"\0").decode()


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_source_compiles_for_sm90(key):
    ptx = _ptx(key)
    assert f".entry {key.name}(" in ptx
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k32" in ptx
    assert ("bf16" if key.bf16 else "f16") in ptx.split("mma.sp::ordered_metadata")[1].split(";")[0]
    # v9: weights by 2-D tensor copies and x by cp.async, both completing on mbarriers
    for op in ("cp.async.bulk.tensor.2d", "cp.async.mbarrier.arrive.noinc", "mbarrier.try_wait.parity"):
        assert (op in ptx) == (key.ver == 9)
    # programmatic dependent launch: every version waits for the grid before; v9 also releases the next one,
    # and its first weight copies come before the wait
    assert "griddepcontrol.wait" in ptx
    assert ("griddepcontrol.launch_dependents" in ptx) == (key.ver == 9)
    if key.ver == 9:
        assert ptx.index("cp.async.bulk.tensor.2d") < ptx.index("griddepcontrol.wait")
    assert ("%globaltimer" in ptx) == key.probe  # the timeline build only


def test_pdl_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("TILESPARSE_PDL", raising=False)
    assert not cm.pdl_enabled()  # opt-in
    monkeypatch.setenv("TILESPARSE_PDL", "1")
    assert cm.pdl_enabled()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not cm.pdl_enabled()


def test_configured_source_and_names():
    src = cm.configured_source(KEYS[0])
    assert "#define NOCT 1\n" in src and "#define HAS_BIAS 1\n" in src and f"#define KNAME {KEYS[0].name}" in src
    assert len({k.name for k in KEYS}) == len(KEYS)


def test_step_table_lists_each_kinds_columns():
    from tilesparse.masks.tiles import DENSE, SPARSE
    for N, K, tile in ((256, 512, (128, 128)), (192, 320, (64, 128)), (128, 256, (64, 64))):
        p = random_layer(N, K, tile, 0.5, 0.2, seed=N + K)[2]
        tab = cm.step_table(p)
        assert cm.step_table(p) is tab and tab.dtype == torch.int32 and tab.device.type == "cpu"  # cached
        TC = p.tile_cols
        for r in range(p.grid.n_rows):
            want = []
            for kind in (SPARSE, DENSE):
                for c in range(p.grid.n_cols):
                    if int(p.tile_kinds[r, c]) == kind:
                        want += [c * TC + 64 * q for q in range(min(TC, K - c * TC) // 64)]
            assert tab[r, :len(want)].tolist() == want
        S = max(int(p.row_info[r, 0] + p.row_info[r, 5]) // 64 for r in range(p.grid.n_rows))
        assert tab.shape == (p.grid.n_rows, max(1, S))  # the most steps of any tile-row
        p.rebuild_layout()  # a new layout drops the cached table
        assert cm.step_table(p) is not tab


def test_v9_item_table_cuts_each_kind_into_items():
    for N, K, tile, spb in ((256, 1024, (128, 128), 4), (1000, 576, (128, 128), 2), (192, 1280, (64, 128), 8)):
        p = random_layer(N, K, tile, 0.5, 0.2, seed=N + spb)[2]
        items, split = cm.item_table(p, spb)
        assert cm.item_table(p, spb)[0] is items and items.shape == (p.grid.n_rows, split, 4 + spb)
        tab = cm.step_table(p)
        for r in range(p.grid.n_rows):
            n_sp, n_dn = int(p.row_info[r, 0]) // 64, int(p.row_info[r, 5]) // 64
            got = {1: [], 0: []}
            kinds = []
            for kind, m, k0, _, *cols in items[r].tolist():
                if m == 0:
                    assert kind == 0 and not any(cols)
                    continue
                assert k0 == len(got[kind]) and cols[:m] == tab[r, k0 + (0 if kind else n_sp):][:m].tolist()
                got[kind] += cols[:m]
                kinds.append(kind)
            assert len(got[1]) == n_sp and len(got[0]) == n_dn  # every step once, in order
            assert all(a != b for a, b in zip(kinds, kinds[1:min(len(kinds), 2 * min(kinds.count(0), kinds.count(1)))]))
        assert split == max(-(-int(p.row_info[r, 0]) // 64 // spb) - (-int(p.row_info[r, 5]) // 64 // spb)
                            for r in range(p.grid.n_rows))
        p.rebuild_layout()
        assert cm.item_table(p, spb)[0] is not items


def test_v9_block_ranges_and_fit(monkeypatch):
    p = random_layer(1024, 2048, (128, 128), 0.5, 0.0, seed=3)[2]
    items, split = cm.item_table(p, 4)
    T = p.grid.n_rows * 2 * split  # 64-row chunks
    for blocks, cost in ((132, None), (7, None), (132, 2048)):
        r = cm.block_ranges(p, 4, 64, blocks, cost).tolist()
        assert r[0] == 0 and r[-1] == T and all(a <= b for a, b in zip(r, r[1:])) and len(r) == blocks + 1
    even = cm.block_ranges(p, 4, 64, 7)
    assert max(even[1:] - even[:-1]) - min(even[1:] - even[:-1]) <= 1  # the default: equal item counts
    with pytest.raises(ValueError, match="items per block"):
        cm.block_ranges(p, 4, 64, 2)
    assert cm.v9_fits(4, 2, 4, 5) and not cm.v9_fits(4, 2, 4, 6) and not cm.v9_fits(3, 1, 4, 2)
    assert not cm.v9_fits(16, 2, 4, 2) and not cm.v9_fits(2, 1, 4, 1)
    for M in (1, 16, 64):
        cs = ops.v9_candidates(M)
        assert all(cm.v9_fits(c.nit, cm.octets(M), c.warps, c.ts) for c in cs)
        # per (warps, steps per item): the most stages for one block per SM, and for two when that fits
        per_sm = {}
        for c in cs:
            per_sm.setdefault((c.warps, c.nit), []).append(cm.v9_blocks_per_sm(c.nit, cm.octets(M), c.warps, c.ts))
        per_sm = {k: sorted(v) for k, v in per_sm.items()}
        assert any(v[-1] >= 2 for v in per_sm.values()) and all(v[0] == 1 or len(v) == 1 for v in per_sm.values())
    assert cm.v9_blocks_per_sm(2, 1, 4, 5) == 2 and cm.v9_blocks_per_sm(2, 1, 4, 6) == 1
    monkeypatch.setattr(cm, "mma_supported", lambda packed: True)
    monkeypatch.setattr(cm, "v9_available", lambda device=None: True)
    monkeypatch.setattr(cm, "_sm_count", lambda device: 132)
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    cfg = ops._fit(C("mma", mode=9, bm=16, split=1, warps=4, ts=5, nit=4), p)
    assert (cfg.mode, cfg.split, cfg.nit, cfg.ts, cfg.bn) == (9, split, 4, 5, 64)
    assert ops._fit(C("mma", mode=9, bm=16, split=1, warps=4, ts=6, nit=4), p) is None  # 6 stages do not fit


def test_fit_takes_only_the_mma_modes_and_known_paths(monkeypatch):
    p = random_layer(256, 1024, (128, 128), 0.5)[2]
    monkeypatch.setattr(cm, "mma_supported", lambda packed: True)
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    assert ops._fit(C("mma", mode=0, bm=16, split=1, warps=4, ts=2), p).mode == 0
    assert ops._fit(C("mma", mode=8, bm=16, split=1, warps=4, ts=2, nit=8), p) is None  # modes 0 (v7) and 9 (v9) only
    assert ops._fit(C("no-such-path", mode=1, bm=16, bn=32), p) is None


def test_octets():
    assert [cm.octets(m) for m in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]


def test_not_on_cpu_or_interpreter():
    p = random_layer(256, 256, (128, 128), 0.5)[2]
    assert not cm.mma_supported(p)  # CPU weights
    assert ops._fit(C("mma", mode=0, bm=16, split=1, warps=4, ts=2), p) is None
    assert all(c.path != "mma" for c in ops.candidate_configs(16, p, force_kernel=True))


def test_candidates_cover_tokens():
    for M in (1, 5, 16, 33, 64):
        cs = ops.mma_candidates(M)
        assert cs and all(c.path == "mma" and c.bm >= M and c.bm % 8 == 0 for c in cs)


def test_mma_keys_are_the_candidates_compiled_configurations(monkeypatch):
    monkeypatch.setattr(cm, "v9_available", lambda device=None: True)
    for M in (1, 16, 64):
        keys = ops.mma_keys(M)
        assert len(set(keys)) == len(keys)
        assert all(k.noct == cm.octets(M) and k.bf16 and not k.bias and not k.probe for k in keys)
        wanted = {(9 if c.mode == 9 else 7, c.warps, c.ts, c.nit if c.mode == 9 else 0)
                  for c in ops.mma_candidates(M)}  # every candidate's kernel, once
        assert {(k.ver, k.warps, k.nst if k.ver == 9 else k.sb, k.spb) for k in keys} == wanted
        assert all(k.sb == 1 for k in keys if k.ver == 9)
    monkeypatch.setattr(cm, "v9_available", lambda device=None: False)
    assert all(k.ver != 9 for k in ops.mma_keys(16))
    assert ops.mma_keys(16, bf16=False, bias=True)[0].name.startswith("hybrid_mma_f16_o2")


def test_launch_rejects_too_many_tokens():
    p = random_layer(256, 256, (128, 128), 0.5)[2]
    x = torch.randn(65, 256).bfloat16()
    with pytest.raises(ValueError, match="65 tokens"):
        cm.launch(x, p, None, torch.empty(65, 256, dtype=torch.bfloat16), 4, 1, 2, None, None)


@pytest.mark.skipif(not cm.available(), reason="needs a CUDA GPU of compute capability 8.0+")
@pytest.mark.parametrize("M,split,dtype,bias", [(1, 1, torch.bfloat16, False), (16, 4, torch.bfloat16, True),
                                                (33, 2, torch.float16, True), (64, 8, torch.float16, False)])
def test_mma_matches_reference_on_gpu(M, split, dtype, bias, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # (kernels_testutil sets it for the interpreter tests)
    p = random_layer(512, 1024, (128, 128), 0.5, 0.1, dtype, seed=M)[2].to("cuda")
    b = torch.randn(512, device="cuda").to(dtype) if bias else None
    x = torch.randn(M, 1024, device="cuda").to(dtype)
    ref = reference_linear_f64(x.cpu(), p.to("cpu"), None if b is None else b.cpu())
    for mode, warps, spb in ((0, 4, 0), (0, 8, 0), (9, 4, 4), (9, 8, 2), (9, 4, 8)):
        cfg = ops._fit(C("mma", mode=mode, bm=M, split=split, warps=warps, ts=2, nit=spb), p)
        if cfg is None:  # v9: sm_90 only, and its stages must fit shared memory
            assert mode == 9 and (not cm.v9_available() or not cm.v9_fits(spb, cm.octets(M), warps, 2))
            continue
        for _ in range(2):  # the split-K counters and workspace must be left reset
            out = torch.full((M, 512), float("nan"), device="cuda", dtype=dtype)
            ops.launch_mma(x, p, b, cfg, out)
            assert rel_error(out.cpu(), ref) < 1e-2


def test_stream_handle_falls_back_to_torch_without_a_triton_driver(monkeypatch):
    import sys

    calls = []

    class FakeStream:
        cuda_stream = 1234

    monkeypatch.setitem(sys.modules, "triton.runtime", None)  # "from triton.runtime import driver" fails
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: calls.append(index) or FakeStream())
    cm.current_stream_handle.cache_clear()
    try:
        query = cm.current_stream_handle()
        assert query(3) == 1234 and calls == [3]
    finally:
        cm.current_stream_handle.cache_clear()


@pytest.mark.skipif(not cm.available(), reason="needs a CUDA GPU of compute capability 8.0+")
def test_stream_handle_is_torchs_current_stream():
    query = cm.current_stream_handle()
    dev = torch.cuda.current_device()
    assert query(dev) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert query(dev) == side.cuda_stream != torch.cuda.default_stream(dev).cuda_stream


@pytest.mark.skipif(not cm.available(), reason="needs a CUDA GPU of compute capability 8.0+")
def test_precompile_fills_the_kernel_cache(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    keys = ops.mma_keys(16)[:3] + ops.mma_keys(1)[-2:]
    for k in keys:
        cm._KERNELS.pop((k, cm._arch()), None)
    assert cm.precompile(keys + keys[:1], threads=4) == len(keys)
    assert all(cm.compiled(k) for k in keys) and cm.precompile(keys) == 0
    p = random_layer(256, 512, (128, 128), 0.5, 0.0, torch.bfloat16, seed=3)[2].to("cuda")
    x = torch.randn(16, 512, device="cuda").bfloat16()
    cfg = ops._fit(ops.mma_candidates(16)[0], p)
    out = torch.empty(16, 256, device="cuda", dtype=torch.bfloat16)
    ops.launch_mma(x, p, None, cfg, out)  # a precompiled kernel runs
    assert rel_error(out.cpu(), reference_linear_f64(x.cpu(), p.to("cpu"), None)) < 1e-2


@pytest.mark.skipif(not cm.available(), reason="needs a CUDA GPU of compute capability 8.0+")
@pytest.mark.parametrize("mode,warps,spb", [(0, 4, 0), (9, 4, 4), (9, 8, 2)])
@pytest.mark.parametrize("pdl", ["1", "0"])
def test_mma_chain_reads_the_previous_kernels_output(mode, warps, spb, pdl, monkeypatch):
    """Each layer's input is the output the kernel before it has just written (ours or torch's; launched as
    programmatic dependents on sm_90): a kernel reading x before its wait would see the NaNs the buffer held."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TILESPARSE_PDL", pdl)
    M, K = 16, 1024
    layers = [random_layer(K, K, (128, 128), f, 0.1, seed=10 + i)[2].to("cuda") for i, f in enumerate((0.5, 1, 0.25))]
    cfgs = [ops._fit(C("mma", mode=mode, bm=M, split=2, warps=warps, ts=2, nit=spb), p) for p in layers]
    if any(c is None for c in cfgs):
        assert mode == 9 and not cm.v9_available()
        pytest.skip("v9 needs sm_90")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) / 8
    ref = x.cpu().double()
    for i, p in enumerate(layers):
        ref = reference_linear_f64(ref.bfloat16(), p.to("cpu"), None).double() / (8 if i == 1 else 1)
    for graph in (False, True):
        bufs = [torch.full((M, K), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in layers]

        def chain():
            h = x
            for i, (p, c, o) in enumerate(zip(layers, cfgs, bufs)):
                ops.launch_mma(h, p, None, c, o)  # layer 1 right after layer 0's kernel
                if i == 1:
                    o.div_(8)  # layer 2 after a torch kernel
                h = o
            return h

        torch.cuda.synchronize()
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain()
            for o in bufs:
                o.fill_(float("nan"))
            g.replay()
        else:
            chain()
        torch.cuda.synchronize()
        assert rel_error(bufs[-1].cpu(), ref) < 3e-2


@pytest.mark.skipif(not cm.available(), reason="needs a CUDA GPU of compute capability 8.0+")
@pytest.mark.parametrize("M", [1, 16])
def test_prepared_launch_binds_fresh_inputs_each_call(M, monkeypatch):
    """A prepared launch (what hybrid_linear keeps per layer) reads the x, bias and output of each call: fresh
    buffers, a strided x, with and without split-K, eagerly and captured in a CUDA graph."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = random_layer(512, 1024, (128, 128), 0.5, 0.1, torch.bfloat16, seed=7)[2].to("cuda")
    for mode, warps, spb, split in ((0, 4, 0, 1), (0, 4, 0, 4), (9, 4, 4, 1), (9, 8, 2, 1)):
        cfg = ops._fit(C("mma", mode=mode, bm=M, split=split, warps=warps, ts=2, nit=spb), p)
        if cfg is None:
            continue
        run = ops._prepared_runner(p, cfg, M, True)
        for i in range(3):
            xb = torch.randn(M, 1024 + 64 * i, device="cuda").bfloat16()
            x, b = xb[:, :1024], torch.randn(512, device="cuda").bfloat16()  # row stride 1024 + 64 i
            ref = reference_linear_f64(x.cpu(), p.to("cpu"), b.cpu())
            assert rel_error(run(x, b).cpu(), ref) < 1e-2, (cfg.short(), i)
        x = torch.randn(M, 1024, device="cuda").bfloat16()
        b = torch.randn(512, device="cuda").bfloat16()
        run(x, b)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = run(x, b)
        x.copy_(torch.randn_like(x))
        g.replay()
        assert rel_error(y.cpu(), reference_linear_f64(x.cpu(), p.to("cpu"), b.cpu())) < 1e-2, cfg.short()
    launch = cm.prepare(p, M, False, 4, 1, 2, None, None)
    with pytest.raises(ValueError, match="prepared for"):
        launch(torch.randn(M + 1, 1024, device="cuda").bfloat16(), torch.empty(M + 1, 512, device="cuda"))
