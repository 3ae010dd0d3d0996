"""The 4-bit sparse-tensor-core kernel (:mod:`tilesparse.kernels.cuda_mma_q4`, ``csrc/hybrid_mma_q4.cu``) on the
CPU:

* its source compiled by NVRTC to PTX for sm_90 and sm_80, and to sm_90 code without register spills for the
  configurations the library and the benchmark run (``cuda-bindings`` + ``nvidia-cuda-nvrtc``; skipped without);
* its source run by the host emulation of ``mma_emulator.h`` (g++; skipped without) against the float64 product
  on the dequantized weight -- the GPU-checked v7 kernel runs through the same emulation as its control, and
  kernels with a wrong layout are shown to fail it;
* the launcher's refusals and tables, and the ``TILESPARSE_Q4_MMA`` switch of ``library.q4_linear``.

On a GPU the kernel is checked by ``benchmarks/q4_decode.py`` (passed on the H100 at 1 and 16 tokens)."""

from __future__ import annotations

from types import SimpleNamespace

import mma_emulator as emu
import pytest
import torch
from kernels_testutil import assert_no_spills_sm90, mma_ptx, q4_layer, random_layer

from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import cuda_mma_q4 as cq
from tilesparse.kernels.format_q4 import unpack_q4
from tilesparse.kernels.reference import reference_linear_f64, rel_error
from tilesparse.masks.tiles import DENSE, SPARSE, ZERO

TOL = 1e-2  # 16-bit outputs (the emulated kernels land near 2e-3 in bf16, 2e-4 in fp16)

KEYS = [cq.MmaQ4Key(True, 1, 4, 2, False), cq.MmaQ4Key(False, 1, 8, 1, True), cq.MmaQ4Key(True, 2, 8, 2, True),
        cq.MmaQ4Key(False, 2, 4, 2, False), cq.MmaQ4Key(True, 8, 4, 1, True), cq.MmaQ4Key(False, 8, 8, 1, False)]


# ---------------------------------------------------------------- NVRTC
@pytest.mark.parametrize("arch", ["compute_90", "compute_80"])
@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_source_compiles_to_ptx(key, arch):
    ptx = mma_ptx(key, arch)
    t = "bf16" if key.bf16 else "f16"
    # codes: 4-byte (2:4) and 8-byte (dense) loads, dequantized by prmt and two 16-bit-pair fma in x's type
    for op in ("ld.global.nc.u32", "ld.global.nc.v2.u32", "prmt.b32", f"fma.rn.{t}x2", "cp.async.ca.shared.global"):
        assert op in ptx, op
    assert ("griddepcontrol.wait" in ptx) == (arch == "compute_90")


@pytest.mark.parametrize("key", [cq.MmaQ4Key(True, 1, 4, 2, False, 4), cq.MmaQ4Key(False, 2, 4, 1, True, 3)],
                         ids=lambda k: k.name)
def test_staged_source_compiles_to_ptx(key):
    """qst > 0: the codes, metadata and parameter words come by cp.async (4 and 8 bytes), qst - 2 groups pending."""
    ptx = mma_ptx(key, "compute_90")
    copies = [ln for ln in ptx.splitlines() if "cp.async.ca.shared.global" in ln]
    assert any(", 4," in ln for ln in copies) and any(", 8," in ln for ln in copies)
    assert f"cp.async.wait_group {key.qst - 2};" in ptx and "ld.global.nc.v2.u32" not in ptx


@pytest.mark.parametrize("M,warps,sb,qst", [(1, 4, 2, 0), (1, 4, 1, 0), (1, 8, 1, 0), (16, 4, 2, 0), (16, 8, 1, 0),
                                           (64, 4, 1, 0), (1, 4, 2, 4), (16, 4, 2, 3)])
def test_no_register_spills_on_sm90(M, warps, sb, qst):
    """The default configurations (``default_config``) and the benchmark's candidates fit 128 registers."""
    assert_no_spills_sm90(cq.MmaQ4Key(True, cm.octets(M), warps, sb, False, qst))


def test_keys_and_sources():
    key = KEYS[2]
    src = cm.configured_source(key)  # cuda_mma compiles q4 keys through their own source
    assert src == key.configured_source() and "#define NOCT 2\n" in src and f"#define KNAME {key.name}\n" in src
    assert "hybrid_mma_q4" in key.name and len({k.name for k in KEYS}) == len(KEYS)
    assert cq.I_SX == emu._kernel_params(src).index("int") + 2  # x's row stride: after M and N


# ---------------------------------------------------------------- the host emulation
@pytest.fixture(scope="module")
def emu_dir(tmp_path_factory):
    if emu.compiler() is None:
        pytest.skip("the kernel emulation needs g++")
    return tmp_path_factory.mktemp("mma_emu")


def _emulate_q4(emu_dir, p, x, bias, warps, split, sb, source=None, seed=0, qst=0):
    """The 4-bit kernel's output in emulation (launch parameters from ``launch_plan``, bound as ``MmaLaunch``
    binds them), and the split-K workspace and counters after the launch."""
    M, N = x.shape[0], p.out_features
    ws = torch.zeros(M * N)
    cnt = torch.zeros(p.grid.n_rows * (p.tile_rows // (16 * warps)), dtype=torch.int32)
    key, grid, block, args = cq.launch_plan(p, M, x.dtype, bias is not None, warps, split, sb, ws, cnt, qst)
    out = torch.full((M, N), float("nan"), dtype=x.dtype)
    args[:5] = [x, out, bias if bias is not None else out] + ([ws, cnt] if split > 1 else [out, out])
    args[cq.I_SX:cq.I_SX + 2] = [x.stride(0), out.stride(0)]
    emu.build(source or key.configured_source(), emu_dir).run(args, grid[:2], block[0], seed)
    return out, ws, cnt


def _q4_reference(x, p, bias):
    y = x.double() @ unpack_q4(p).double().T
    return y if bias is None else y + bias.double()


def _rows_layer():
    """4 tile-rows of 64: all dense, all 2:4, all zero, mixed with a zero tile."""
    kinds = torch.tensor([[DENSE] * 4, [SPARSE] * 4, [ZERO] * 4, [SPARSE, ZERO, DENSE, SPARSE]], dtype=torch.int8)
    return q4_layer(256, 512, (64, 128), 128, kinds=kinds, seed=5)


Q4_CASES = [  # (layer, tokens, dtype, bias, warps, split, sb[, qst])
    (lambda: q4_layer(256, 512, (128, 128), 128, seed=1), 1, torch.bfloat16, False, 4, 1, 2),
    # last tile-row of 80 rows (three idle warps in its second chunk), a 64-column edge tile; split-K
    (lambda: q4_layer(208, 576, (128, 128), 64, seed=2), 9, torch.float16, True, 4, 2, 1),
    # 40 tokens: 8 token octets
    (lambda: q4_layer(192, 640, (64, 128), 64, frac_sparse=0.5, frac_zero=0.1, seed=3), 40, torch.bfloat16, True,
     4, 3, 2),
    # groups of 192 across tile edges, 256-wide tiles
    (lambda: q4_layer(256, 768, (128, 256), 192, seed=4), 16, torch.bfloat16, False, 8, 1, 1),
    (lambda: q4_layer(128, 512, (64, 64), 256, seed=6), 3, torch.float16, False, 2, 5, 2),
    (_rows_layer, 64, torch.bfloat16, True, 4, 2, 1),
    # four steps per batch (the most bytes in flight the registers hold), a batch cut short at the split's end
    (lambda: q4_layer(256, 1216, (128, 64), 64, frac_sparse=0.5, seed=7), 1, torch.bfloat16, True, 4, 2, 4),
    (lambda: q4_layer(128, 640, (128, 128), 128, seed=8), 16, torch.float16, False, 4, 1, 4),
    # codes through shared memory: 4 stages (3 batches in flight), blocks shorter and longer than the pipeline
    (lambda: q4_layer(256, 1216, (128, 64), 64, frac_sparse=0.5, seed=9), 1, torch.bfloat16, True, 4, 2, 2, 4),
    (lambda: q4_layer(192, 640, (64, 128), 64, frac_sparse=0.5, frac_zero=0.1, seed=10), 16, torch.float16, False,
     4, 3, 1, 3),
    (_rows_layer, 9, torch.bfloat16, True, 2, 1, 2, 3),
    (lambda: q4_layer(256, 512, (128, 128), 128, seed=11), 40, torch.bfloat16, False, 8, 1, 1, 2),
    # groups of 32 and 16: a thread's columns of a step in the group 16t / GS past the step's first
    (lambda: q4_layer(256, 640, (128, 128), 32, frac_sparse=0.5, frac_zero=0.1, seed=14), 1, torch.bfloat16, True,
     4, 2, 2),
    (lambda: q4_layer(192, 512, (64, 64), 32, frac_sparse=0.5, seed=15), 16, torch.float16, False, 4, 1, 1),
    (lambda: q4_layer(128, 512, (128, 128), 16, frac_sparse=0.5, seed=16), 9, torch.bfloat16, True, 8, 2, 1, 3),
]


@pytest.mark.parametrize("case", range(len(Q4_CASES)))
def test_q4_kernel_matches_reference_in_emulation(emu_dir, case):
    make, M, dtype, has_bias, warps, split, sb, *pipe = Q4_CASES[case]
    qst = pipe[0] if pipe else 0
    p = make()
    g = torch.Generator().manual_seed(case)
    x = torch.randn(M, p.in_features, generator=g).to(dtype)
    bias = torch.randn(p.out_features, generator=g).to(dtype) if has_bias else None
    out, ws, cnt = _emulate_q4(emu_dir, p, x, bias, warps, split, sb, seed=case, qst=qst)
    assert rel_error(out, _q4_reference(x, p, bias)) < TOL
    assert not ws.any() and not cnt.any()  # split-K leaves its workspace and counters zero


@pytest.mark.parametrize("dtype,M,warps,split,sb,bias", [(torch.bfloat16, 9, 4, 1, 2, True),
                                                        (torch.float16, 1, 8, 3, 1, False)])
def test_emulation_reproduces_the_gpu_checked_v7_kernel(emu_dir, dtype, M, warps, split, sb, bias):
    """v7 (hybrid_mma.cu, checked on GPUs) through the same emulation: the control of the emulated PTX
    semantics (MMA fragments, metadata, cp.async) the 4-bit kernel relies on."""
    p = random_layer(256, 512, (128, 128), 0.5, 0.2, dtype, seed=M)[2]
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 512, generator=g).to(dtype)
    b = torch.randn(256, generator=g).to(dtype) if bias else None
    key = cm.MmaKey(dtype == torch.bfloat16, cm.octets(M), warps, sb, bias)
    cpt = p.tile_rows // (16 * warps)
    out = torch.full((M, 256), float("nan"), dtype=dtype)
    ws, cnt = torch.zeros(M * 256), torch.zeros(p.grid.n_rows * cpt, dtype=torch.int32)
    args = [x, out, b if bias else out] + ([ws, cnt] if split > 1 else [out, out]) + [
        p.sp_vals, p.sp_meta, p.dn_vals, p.sp_cols, p.sp_ptr, p.dn_cols, p.dn_ptr, p.row_info, M, 256,
        x.stride(0), out.stride(0), split, cpt, p.tile_rows, p.tile_cols.bit_length() - 1]
    emu.build(cm.configured_source(key), emu_dir).run(args, (p.grid.n_rows * cpt, split), 32 * warps)
    assert rel_error(out, reference_linear_f64(x, p, b)) < TOL


MUTATIONS = {  # a wrong layout each (source text -> replacement): the emulated kernel must miss the reference
    "the 16-bit kernel's dense x order": ("const int o_dn = DENSE_ORDER == 0 ?", "const int o_dn = DENSE_ORDER < 2 ?"),
    "a byte's two codes swapped": ("i | ((i + 4) << 8)", "(i + 4) | (i << 8)"),
    "dense sub-steps 0-1 and 2-3 swapped": ("dequant_word(c.x, sg, zg), dequant_word(c.z, sg8, zg8), dequant_word(c.y",
                                            "dequant_word(c.y, sg, zg), dequant_word(c.z, sg8, zg8), dequant_word(c.x"),
    "scale and zero swapped": ("zg = __byte_perm(pz.x, 0, 0x3232)", "zg = __byte_perm(pz.x, 0, 0x1010)"),
    "x read before its copies landed": ('asm volatile("cp.async.wait_group 0;" ::: "memory");', ""),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_emulation_rejects_a_wrong_layout(emu_dir, name):
    p = q4_layer(208, 576, (128, 128), 64, seed=2)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    old, new = MUTATIONS[name]
    src = cq.MmaQ4Key(True, 2, 4, 2, False).configured_source()
    assert src.count(old) == 1
    out = _emulate_q4(emu_dir, p, x, None, 4, 1, 2, source=src.replace(old, new))[0]
    assert not rel_error(out, _q4_reference(x, p, None)) < 0.1


STAGED_MUTATIONS = {  # the shared-memory pipeline (qst > 0) with a wrong step each
    "a batch read one stage early": ('"n"(QST - 2)', '"n"(QST - 1)'),
    "a stage refilled before every warp is past it": (
        "        __syncthreads();\n        issue(s0 + (QST - 1) * SB", "        issue(s0 + (QST - 1) * SB"),
}


@pytest.mark.parametrize("name", list(STAGED_MUTATIONS))
def test_emulation_rejects_a_wrong_pipeline(emu_dir, name):
    p = q4_layer(208, 576, (128, 128), 64, seed=2)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    old, new = STAGED_MUTATIONS[name]
    src = cq.MmaQ4Key(True, 2, 4, 1, False, 3).configured_source()
    assert src.count(old) == 1
    try:
        out = _emulate_q4(emu_dir, p, x, None, 4, 1, 1, source=src.replace(old, new), qst=3)[0]
    except AssertionError as e:  # poisoned (not yet copied) metadata stops the emulated mma.sp
        assert "kernel emulation stopped" in str(e)
        return
    assert not rel_error(out, _q4_reference(x, p, None)) < 0.1


# ---------------------------------------------------------------- launcher
def test_unsupported_layers_are_refused_in_one_line():
    for p, msg in ((q4_layer(64, 256, (64, 128), 48), "group_size=48 is not 16, 32 or a multiple of 64"),
                   (q4_layer(64, 256, (64, 32), 64), "tile_cols=32"),
                   (q4_layer(64, 256, (8, 128), 64), "tile_rows=8"),
                   (q4_layer(72, 256, (16, 128), 64), "out_features=72"),
                   (q4_layer(64, 288, (64, 128), 96), "in_features=288")):
        why = cq.layout_reason(p)
        assert msg in why and "\n" not in why and cq.unsupported_reason(p) == why and not cq.mma_q4_supported(p)
        with pytest.raises(ValueError, match=msg) as info:
            cq.q4_mma_linear(torch.randn(2, p.in_features).bfloat16(), p)
        assert "\n" not in str(info.value)
    p = q4_layer(64, 256, (64, 128), 128)
    assert cq.layout_reason(p) is None and "not on a CUDA device" in cq.unsupported_reason(p)
    assert not cq.mma_q4_supported(p)
    assert "_mma_q4" not in p.to("cpu").__dict__  # a copy is a layer of its own: answers are per layer


def test_launch_plan_checks_the_configuration():
    p = q4_layer(128, 512, (64, 128), 128, seed=1)
    bf = torch.bfloat16
    key, grid, block, args = cq.launch_plan(p, 16, bf, True, 2, 1, 2, None, None)
    assert key == cq.MmaQ4Key(True, 2, 2, 2, True) and grid == (4, 1, 1) and block == (64, 1, 1)
    assert len(args) == len(emu._kernel_params(key.configured_source()))
    cases = [((65, bf, False, 4, 1, 2), "1..64 tokens"), ((1, torch.float32, False, 4, 1, 2), "bfloat16 or float16"),
             ((1, bf, False, 8, 1, 2), "warps=8"), ((1, bf, False, 3, 1, 2), "warps=3"),
             ((64, bf, False, 4, 1, 3), "shared memory"), ((1, bf, False, 4, 2, 2), "split > 1 needs ws")]
    for a, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cq.launch_plan(p, *a, None, None)
    wide = q4_layer(16, 64 * (cq.MAX_STEPS + 1), (16, 64), 64, frac_sparse=0.0, frac_zero=0.0)
    with pytest.raises(ValueError, match="more than 512 steps"):
        cq.launch_plan(wide, 1, bf, False, 1, 1, 2, None, None)
    cq.launch_plan(wide, 1, bf, False, 1, 2, 2, torch.zeros(16), torch.zeros(1, dtype=torch.int32))
    assert cq.launch_plan(p, 1, bf, False, 4, 1, 2, None, None, 3)[0].name.endswith("_s2_q3")


@pytest.mark.parametrize("dtype,neg_magic", [(torch.bfloat16, 0xC300), (torch.float16, 0xE400)])
def test_param_table_holds_each_rows_scale_and_zero(dtype, neg_magic):
    p = q4_layer(96, 512, (32, 128), 128, seed=2)
    tab = cq.param_table(p, dtype)
    assert cq.param_table(p, dtype) is tab and tab.dtype == torch.int32 and tab.shape == (6, 4, 8, 2)
    words = tab.permute(0, 3, 2, 1).reshape(96, 4)  # [row 16 s + 8 h + g, group]
    low = (words & 0xFFFF).to(torch.int32)
    high = ((words >> 16) & 0xFFFF).to(torch.int32)
    want_scale = p.scales.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(low, want_scale) and torch.equal(high, p.zeros.to(torch.int32) | neg_magic)
    # -(MAGIC + zero) decodes to minus (128 / 1024 + zero)
    magic = 128 if dtype == torch.bfloat16 else 1024
    assert torch.equal((high - 65536).to(torch.int16).view(dtype).double(), -(magic + p.zeros.double()))
    p.rebuild_layout()  # tables and launches are per layout
    assert cq.param_table(p, dtype) is not tab


def test_default_config():
    p = q4_layer(256, 1024, (128, 128), 128)
    assert cq.default_config(1, p, 132) == {"warps": 4, "split": 2, "sb": 2}  # 16 steps -> split <= 2
    assert cq.default_config(40, p, 1) == {"warps": 4, "split": 1, "sb": 1}
    # LLaMA-2-7B layers of 128-row tiles on 132 multiprocessors: split-K fills one wave of 4 blocks per SM (528)
    for n_rows, k, split in ((86, 4096, 3), (32, 4096, 8), (32, 11008, 8)):
        shape = SimpleNamespace(tile_rows=128, grid=SimpleNamespace(n_rows=n_rows), in_features=k)
        cfg = cq.default_config(1, shape, 132)
        assert cfg["split"] == split and n_rows * 2 * split <= 528 < n_rows * 2 * (split + 1)
    assert cq.default_config(1, SimpleNamespace(tile_rows=128, grid=SimpleNamespace(n_rows=32), in_features=512),
                             132)["split"] == 1  # 8 steps: a block keeps at least 8
    assert cq.default_config(1, q4_layer(96, 1024, (32, 128), 128), 4)["warps"] == 2
    assert cq.default_config(1, q4_layer(48, 1024, (48, 128), 128), 4)["warps"] == 1
    for M, q in ((1, p), (64, q4_layer(48, 1024, (48, 128), 128))):
        cfg = cq.default_config(M, q, 132)
        cq.launch_plan(q, M, torch.bfloat16, False, cfg["warps"], cfg["split"], cfg["sb"],
                       torch.zeros(M * q.out_features), torch.zeros(64, dtype=torch.int32))


# ---------------------------------------------------------------- the switch in library.q4_linear
@pytest.fixture
def routes(monkeypatch):
    """``library.q4_linear`` on the CPU as if ``x`` were on CUDA: the Triton, mma and unpack routes record their
    calls."""
    from tilesparse.kernels import library

    calls = []

    def triton(x2, p, b):
        calls.append("triton")
        return torch.zeros(x2.shape[0], p.out_features, dtype=x2.dtype)

    def mma(x, p, b):
        calls.append("mma")
        return torch.zeros(*x.shape[:-1], p.out_features, dtype=x.dtype)

    def unpack(x, p, b):
        calls.append("unpack")
        return torch.zeros(*x.shape[:-1], p.out_features, dtype=x.dtype)

    monkeypatch.setattr(library, "_x_fits_kernel", lambda x, p: True)
    monkeypatch.setattr(library, "_q4_triton_launcher", lambda: triton)
    monkeypatch.setattr(library, "_q4_mma", mma)
    monkeypatch.setattr(library, "_q4_unpack", unpack)
    monkeypatch.setattr(library, "_Q4_TRITON_FAILED", [None])
    monkeypatch.delenv("TILESPARSE_Q4_MMA", raising=False)
    return library, calls


def test_mma_kernel_is_the_default_up_to_16_tokens(routes, monkeypatch):
    library, calls = routes
    p = q4_layer(64, 256, (64, 128), 128, seed=1)
    monkeypatch.setattr(cq, "mma_q4_supported", lambda packed: True)
    x = torch.randn(2, 256).bfloat16()
    library.q4_linear(x, p)  # on by default
    library.q4_linear(torch.randn(2, 8, 256).bfloat16(), p)  # 16 tokens: the last count it takes
    library.q4_linear(x, p, use_triton=True)  # forcing Triton still does
    assert calls == ["mma", "mma", "triton"]
    x40 = torch.randn(2, 20, 256).bfloat16()  # 40 tokens: beyond both decode kernels, the unpack route
    library.q4_linear(x40, p)
    assert calls == ["mma", "mma", "triton", "unpack"]
    del calls[-1]
    monkeypatch.setattr(cq, "mma_q4_supported", lambda packed: False)
    library.q4_linear(x, p)
    assert calls[-1] == "triton"
    monkeypatch.setattr(cq, "mma_q4_supported", lambda packed: True)
    monkeypatch.setenv("TILESPARSE_Q4_MMA", "0")
    library.q4_linear(x, p)  # switched off: the Triton kernel
    assert calls[-1] == "triton" and len(calls) == 5


def test_group_sizes_the_kernel_refuses_stay_with_triton(routes, monkeypatch):
    library, calls = routes
    x = torch.randn(2, 256).bfloat16()
    library.q4_linear(x, q4_layer(64, 256, (64, 128), 48, seed=1))  # group 48: the real check refuses it
    assert calls == ["triton"]
    # groups of 16: the kernel takes them (emulation only), the route keeps to the sizes checked on a GPU
    monkeypatch.setattr(cq, "mma_q4_supported", lambda packed: True)
    library.q4_linear(x, q4_layer(64, 256, (64, 128), 16, seed=1))
    library.q4_linear(x, q4_layer(64, 256, (64, 128), 32, seed=1))
    library.q4_linear(x, q4_layer(64, 256, (64, 128), 128, seed=1))
    assert calls == ["triton", "triton", "mma", "mma"]


def test_mma_route_runs_the_default_configuration(monkeypatch):
    from tilesparse.kernels import library

    got = {}

    def fake(x2, p, b, **cfg):
        got.update(shape=tuple(x2.shape), bias=None if b is None else b.dtype, **cfg)
        return torch.zeros(x2.shape[0], p.out_features, dtype=x2.dtype)

    monkeypatch.setattr(cm, "_sm_count", lambda device: 132)
    monkeypatch.setattr(cq, "q4_mma_linear", fake)
    p = q4_layer(256, 1024, (128, 128), 128)
    y = library._q4_mma(torch.randn(3, 5, 1024).half(), p, torch.randn(256))
    assert y.shape == (3, 5, 256) and y.dtype == torch.float16
    assert got == {"shape": (15, 1024), "bias": torch.float16, **cq.default_config(15, p, 132)}
    assert cq.layer_config(15, p) is cq.layer_config(15, p)  # cached on the layer
