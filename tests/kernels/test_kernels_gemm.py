"""The hybrid GEMM (:mod:`tilesparse.kernels.cuda_gemm`, ``csrc/hybrid_gemm.cu``) on the CPU:

* its source compiled by NVRTC to PTX for sm_90 and sm_80, and to sm_90 code without register spills
  (``cuda-bindings`` + ``nvidia-cuda-nvrtc``; skipped without);
* its source run by the host emulation of ``mma_emulator.h`` (g++; skipped without) against the float64
  reference on every shape class (partial tile-rows, all-dense, all-2:4 and all-zero tile-rows, several token
  blocks, split-K, bias, both 16-bit types), and kernels with a wrong layout or a missing wait shown to fail it;
* the launcher's checks.

On a GPU the same cases run on the device (skipped without one), and ``benchmarks/kernel_speed.py --check
--gemm-only`` checks every candidate configuration."""

from __future__ import annotations

import mma_emulator as emu
import pytest
import torch
from kernels_testutil import assert_no_spills_sm90, mma_ptx, random_layer

from tilesparse.kernels import cuda_gemm as cg
from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels.format import pack_from_kinds
from tilesparse.kernels.reference import reference_linear_f64, rel_error
from tilesparse.masks.nm import topk_mask
from tilesparse.masks.tiles import DENSE, SPARSE, ZERO

TOL = 1e-2  # 16-bit outputs

KEYS = [cg.GemmKey(True, 64, 32, 2, 2, 3, False), cg.GemmKey(False, 128, 64, 4, 1, 4, True),
        cg.GemmKey(True, 128, 128, 4, 2, 3, False), cg.GemmKey(True, 64, 16, 4, 1, 2, True),
        cg.GemmKey(False, 128, 64, 2, 2, 3, False)]



# ---------------------------------------------------------------- NVRTC
@pytest.mark.parametrize("arch", ["compute_90", "compute_80"])
@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_source_compiles_to_ptx(key, arch):
    ptx = mma_ptx(key, arch)
    for op in ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global", "cp.async.wait_group"):
        assert op in ptx, op


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_no_register_spills_on_sm90(key):
    assert_no_spills_sm90(key)


# ---------------------------------------------------------------- the host emulation
@pytest.fixture(scope="module")
def emu_dir(tmp_path_factory):
    if emu.compiler() is None:
        pytest.skip("the kernel emulation needs g++")
    return tmp_path_factory.mktemp("gemm_emu")


def _emulate(emu_dir, p, x, bias, cfg, source=None, seed=0):
    """The GEMM's output in emulation (parameters from ``launch_plan``, bound as ``MmaLaunch`` binds them), and the
    split-K workspace and counters after the launch."""
    bm, bt, wm, wn, nst, split = cfg
    M, N = x.shape[0], p.out_features
    ws = torch.zeros(M * N)
    cnt = torch.zeros(p.grid.n_rows * (p.tile_rows // bm) * -(-M // bt), dtype=torch.int32)
    key, grid, block, smem, args = cg.launch_plan(p, M, x.dtype, bias is not None, bm, bt, wm, wn, nst, split, ws, cnt)
    out = torch.full((M, N), float("nan"), dtype=x.dtype)
    args[:5] = [x, out, bias if bias is not None else out] + ([ws, cnt] if split > 1 else [out, out])
    args[cg.I_SX:cg.I_SX + 2] = [x.stride(0), out.stride(0)]
    emu.build(source or key.configured_source(), emu_dir).run(args, grid[:2], block[0], seed)
    return out, ws, cnt


def _rows_layer(dtype):
    """4 tile-rows of 64 (the last one 48 rows): all dense, all 2:4, all zero, mixed with a zero tile."""
    kinds = torch.tensor([[DENSE] * 4, [SPARSE] * 4, [ZERO] * 4, [SPARSE, ZERO, DENSE, SPARSE]], dtype=torch.int8)
    g = torch.Generator().manual_seed(5)
    W = torch.randn(240, 512, generator=g).to(dtype)
    return pack_from_kinds(W, kinds, topk_mask(torch.rand(240, 512, generator=g)), (64, 128))


CASES = [  # (layer, tokens, dtype, bias, (bm, bt, wm, wn, nst, split))
    (lambda d: random_layer(256, 512, (128, 128), 0.5, 0.2, d, seed=1)[2], 40, torch.bfloat16, False,
     (64, 32, 2, 2, 3, 1)),
    # a last tile-row of 80 rows (its second 64-row block has 16), split-K, 9 tokens in a 16-token block
    (lambda d: random_layer(208, 576, (128, 128), 0.5, 0.1, d, seed=2)[2], 9, torch.float16, True,
     (64, 16, 4, 1, 2, 2)),
    # three token blocks (the last one partial), 128-row blocks of 4 x 2 warps, 3-way split-K
    (_rows_layer, 150, torch.bfloat16, True, (64, 64, 2, 2, 4, 3)),
    # 256-wide tiles, one warp column, all 2:4 but a few dense tiles
    (lambda d: random_layer(256, 768, (128, 256), 0.8, 0.0, d, seed=4)[2], 64, torch.bfloat16, False,
     (128, 64, 4, 1, 3, 1)),
    (lambda d: random_layer(128, 512, (64, 64), 0.3, 0.3, d, seed=6)[2], 24, torch.float16, False,
     (64, 32, 4, 1, 2, 5)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gemm_matches_reference_in_emulation(emu_dir, case):
    make, M, dtype, has_bias, cfg = CASES[case]
    p = make(dtype)
    g = torch.Generator().manual_seed(case)
    x = torch.randn(M, p.in_features, generator=g).to(dtype)
    bias = torch.randn(p.out_features, generator=g).to(dtype) if has_bias else None
    out, ws, cnt = _emulate(emu_dir, p, x, bias, cfg, seed=case)
    assert rel_error(out, reference_linear_f64(x, p, bias)) < TOL
    assert not ws.any() and not cnt.any()  # split-K leaves its workspace and counters zero


def test_gemm_reads_a_strided_x(emu_dir):
    """x rows further apart than K (a view of a wider tensor): the row stride is a kernel parameter."""
    p = random_layer(128, 256, (64, 128), 0.5, 0.2, torch.bfloat16, seed=8)[2]
    wide = torch.randn(20, 320, generator=torch.Generator().manual_seed(1)).bfloat16()
    x = wide[:, 32:288]
    M, N = x.shape[0], p.out_features
    key, grid, block, smem, args = cg.launch_plan(p, M, x.dtype, False, 64, 32, 2, 2, 2, 1, None, None)
    out = torch.full((M, N), float("nan"), dtype=x.dtype)
    args[:5] = [wide.view(-1)[32:], out, out, out, out]  # x's first element onwards, rows 320 apart
    args[cg.I_SX:cg.I_SX + 2] = [wide.stride(0), out.stride(0)]
    emu.build(key.configured_source(), emu_dir).run(args, grid[:2], block[0])
    assert rel_error(out, reference_linear_f64(x.contiguous(), p, None)) < TOL


MUTATIONS = {  # a wrong layout each (source text -> replacement): the emulated kernel must miss the reference
    "metadata of the wrong half": ("m0[2 * h + (t & 1)]", "m0[2 * (1 - h) + (t & 1)]"),
    "x chunks not swizzled": ("cp_async16(sxb + swz(n, c)", "cp_async16(sxb + (u32)(n * 128 + 16 * c)"),
    "dense k halves swapped": ("2 * kk + ((lane >> 3) & 1)));\n                } else",
                               "2 * kk + 1 - ((lane >> 3) & 1)));\n                } else"),
    "a stage read before its copies landed": ('"cp.async.wait_group %0;" :: "n"(NST - 2)',
                                              '"cp.async.wait_group %0;" :: "n"(NST - 1)'),
    "no barrier before a stage is refilled": ("        __syncthreads();  // everyone's copies of step i", "        //"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_emulation_rejects_a_wrong_kernel(emu_dir, name):
    p = random_layer(256, 512, (128, 128), 0.5, 0.1, torch.bfloat16, seed=3)[2]
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    cfg = (64, 32, 2, 2, 3, 1)
    old, new = MUTATIONS[name]
    src = cg.GemmKey(True, 64, 32, 2, 2, 3, False).configured_source()
    assert src.count(old) == 1, name
    try:
        out = _emulate(emu_dir, p, x, None, cfg, source=src.replace(old, new))[0]
    except AssertionError as e:  # the emulation itself stopped (a poisoned read, bad metadata)
        assert "kernel emulation stopped" in str(e)
        return
    assert not rel_error(out, reference_linear_f64(x, p, None)) < 0.1


# ---------------------------------------------------------------- launcher
def test_launch_plan_checks_the_configuration():
    p = random_layer(256, 512, (128, 128), 0.5, 0.2, torch.bfloat16, seed=1)[2]
    bf = torch.bfloat16
    key, grid, block, smem, args = cg.launch_plan(p, 100, bf, True, 64, 64, 2, 2, 3, 1, None, None)
    assert key == cg.GemmKey(True, 64, 64, 2, 2, 3, True) and grid == (8, 1, 1) and block == (128, 1, 1)
    assert smem == 3 * (64 * 136 + 64 * 128) and len(args) == len(emu._kernel_params(key.configured_source()))
    assert cg.I_SX == emu._kernel_params(key.configured_source()).index("int") + 2  # after M and N
    cases = [((16, torch.float16, False, 64, 16, 4, 1, 2, 1), "one 16-bit type"),
             ((16, bf, False, 48, 16, 1, 1, 2, 1), "bm=48"),
             ((16, bf, False, 64, 24, 1, 1, 2, 1), "bt=24"),
             ((16, bf, False, 128, 64, 2, 1, 2, 1), "more than 64 accumulators"),
             ((16, bf, False, 64, 16, 4, 1, 7, 1), "nst=7"),
             ((16, bf, False, 64, 16, 4, 1, 2, 2), "split > 1 needs ws")]
    for a, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cg.launch_plan(p, *a, None, None)
    with pytest.raises(ValueError, match="exceed 166912 bytes"):  # an A100's limit
        cg.launch_plan(p, 64, bf, False, 128, 128, 4, 2, 6, 1, None, None, smem_limit=166912)


# ---------------------------------------------------------------- dispatcher
def test_gemm_candidates_are_valid_block_shapes():
    from tilesparse.kernels import ops

    for M, bts in ((16, {16}), (40, {32, 64}), (64, {32, 64})):
        c = ops.gemm_candidates(M)
        assert c and {k.bm for k in c} == bts and all(k.path == "gemm" for k in c)
        assert all(cg.shape_reason(k.bn, k.bm, k.warps, k.nit, k.ts, 128, 232448) is None for k in c)
        assert {k.split for k in c} == {1, 2, 4}


def test_gemm_is_offered_at_16_to_64_tokens_and_never_fitted_on_the_cpu(monkeypatch):
    from tilesparse.kernels import ops

    p = random_layer(256, 512, (128, 128), 0.5, 0.2, torch.bfloat16, seed=1)[2]
    assert ops.GEMM_CANDIDATES is True  # TILESPARSE_GEMM defaults to 1
    assert all(c.path != "gemm" for c in ops.candidate_configs(64, p, force_kernel=True))  # no CUDA device
    assert ops._fit(ops.gemm_candidates(64)[0], p) is None
    assert ops.gemm_candidates(64)[0].short() == "gemm bm32 bn64 w2x2 s1 n4"
    # the token range, with a device and fitting pretended
    monkeypatch.setattr(ops._cm, "available", lambda device=None: True)
    monkeypatch.setattr(ops, "_fit", lambda cfg, packed: cfg)
    offered = {M: any(c.path == "gemm" for c in ops.candidate_configs(M, p)) for M in (1, 15, 16, 33, 64, 65, 256)}
    assert offered == {1: False, 15: False, 16: True, 33: True, 64: True, 65: False, 256: False}
    monkeypatch.setattr(ops, "GEMM_CANDIDATES", False)  # TILESPARSE_GEMM=0
    assert not any(c.path == "gemm" for c in ops.candidate_configs(33, p))


# ---------------------------------------------------------------- GPU
@pytest.mark.skipif(not cm.available(), reason="needs a CUDA GPU of compute capability 8.0+")
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gemm_matches_reference_on_the_gpu(case):
    from tilesparse.kernels import ops

    make, M, dtype, has_bias, (bm, bt, wm, wn, nst, split) = CASES[case]
    p = make(dtype).to("cuda")
    g = torch.Generator().manual_seed(case)
    x = torch.randn(M, p.in_features, generator=g).to(dtype).cuda()
    bias = torch.randn(p.out_features, generator=g).to(dtype).cuda() if has_bias else None
    cfg = ops.KernelConfig("gemm", bm=bt, bn=bm, warps=wm, nit=wn, ts=nst, split=split)
    for _ in range(2):  # split-K leaves its counters reset for the next call
        out = ops.run_config(x, p, bias, cfg)
        assert rel_error(out.cpu(), reference_linear_f64(x.cpu(), p.to("cpu"), None if bias is None else bias.cpu())) \
            < TOL
