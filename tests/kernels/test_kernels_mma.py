"""v7 sparse-tensor-core kernel (:mod:`tilesparse.kernels.cuda_mma`, CUDA C++ through NVRTC).

On the CPU: the configuration logic, and the CUDA source compiled to PTX for sm_90 by NVRTC (the
``nvidia-cuda-nvrtc`` wheel of the dev extras; skipped without it). The kernel's results are checked on a GPU:
here when one is present, and by ``benchmarks/kernels.py --check --mma-only`` (``benchmarks/mma_probe.py``
checks the fragment and metadata layouts the kernel relies on)."""

from __future__ import annotations

import ctypes
import glob
import os

import pytest
import torch

from kernels_testutil import random_layer

from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import ops
from tilesparse.kernels.ops import KernelConfig as C
from tilesparse.kernels.reference import reference_linear_f64, rel_error

KEYS = [cm.MmaKey(True, 1, 4, 2, True), cm.MmaKey(True, 2, 8, 2, False), cm.MmaKey(False, 8, 4, 1, True),
        cm.MmaKey(True, 4, 4, 1, False)]


def _libnvrtc():
    import site
    for d in site.getsitepackages():
        for path in sorted(glob.glob(os.path.join(d, "nvidia", "cu1*", "lib", "libnvrtc.so*"))):
            if "builtins" not in path:
                return ctypes.CDLL(path)
    return None


def _compile_ptx(lib, src: str) -> str:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=compute_90", b"-std=c++17"]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert res == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_source_compiles_for_sm90(key):
    lib = _libnvrtc()
    if lib is None:
        pytest.skip("NVRTC (nvidia-cuda-nvrtc) not installed")
    ptx = _compile_ptx(lib, cm.configured_source(key))
    assert f".entry {key.name}(" in ptx
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k32" in ptx
    assert ("bf16" if key.bf16 else "f16") in ptx.split("mma.sp::ordered_metadata")[1].split(";")[0]


def test_configured_source_and_names():
    src = cm.configured_source(KEYS[0])
    assert "#define NOCT 1\n" in src and "#define HAS_BIAS 1\n" in src and f"#define KNAME {KEYS[0].name}" in src
    assert len({k.name for k in KEYS}) == len(KEYS)


def test_octets():
    assert [cm.octets(m) for m in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]


def test_not_on_cpu_or_interpreter():
    p = random_layer(256, 256, (128, 128), 0.5)[2]
    assert not cm.mma_supported(p)  # CPU weights
    assert ops._fit(C("mma", 0, 16, 0, 0, 1, 4, 1, True, 0, 0, 2), p) is None
    assert all(c.path != "mma" for c in ops.candidate_configs(16, p, force_kernel=True))


def test_candidates_cover_tokens():
    for M in (1, 5, 16, 33, 64):
        cs = ops.mma_candidates(M)
        assert cs and all(c.path == "mma" and c.bm >= M and c.bm % 8 == 0 for c in cs)


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
    for warps in (4, 8):
        cfg = ops._fit(C("mma", 0, M, 0, 0, split, warps, 1, True, 0, 0, 2), p)
        for _ in range(2):  # the split-K counters and workspace must be left reset
            out = torch.full((M, 512), float("nan"), device="cuda", dtype=dtype)
            ops.launch_mma(x, p, b, cfg, out)
            assert rel_error(out.cpu(), ref) < 1e-2
