"""NVRTC and driver-API wrappers (:mod:`tilesparse.kernels.cuda_driver`) and what happens without them."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from tilesparse.kernels import cuda_driver as cd
from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import ops

needs_nvrtc = pytest.mark.skipif(cd.missing() is not None, reason=str(cd.missing()))


@needs_nvrtc
def test_target_arch_is_the_device_or_the_newest_known_ptx():
    archs = cd.supported_archs()
    assert 90 in archs
    assert cd.target_arch((9, 0)) == "sm_90"
    newest = max(archs)
    assert cd.target_arch((newest // 10 + 5, 0)) == f"compute_{newest}"  # a GPU newer than this NVRTC


@needs_nvrtc
def test_compile_source_gives_ptx_or_cubin_and_a_readable_error():
    src = 'extern "C" __global__ void k(float *y) { y[threadIdx.x] = 2.0f; }'
    ptx = cd.compile_source(src, "k", "compute_90")
    assert b".entry k(" in ptx and b".target sm_90" in ptx
    assert cd.compile_source(src, "k", "sm_90")[:4] == b"\x7fELF"
    with pytest.raises(cd.CudaError, match=r"NVRTC could not compile bad for sm_90:\n.*error"):
        cd.compile_source("not C++", "bad", "sm_90")


@needs_nvrtc
def test_compiled_images_are_kept_on_disk_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("TILESPARSE_CACHE", str(tmp_path))
    src = 'extern "C" __global__ void k(float *y) { y[threadIdx.x] = 3.0f; }'
    first = cd.compile_cached(src, "k", "compute_90")
    path = cd.image_cache_path(src, "k", "compute_90", ("-std=c++17",))
    assert path.parent == tmp_path / "nvrtc" and path.read_bytes() == first and b".entry k(" in first
    assert cd.image_cache_path(src + " ", "k", "compute_90", ("-std=c++17",)) != path  # another source
    assert cd.image_cache_path(src, "k", "sm_90", ("-std=c++17",)) != path  # another architecture

    def no_compiler(*a, **k):
        raise AssertionError("compiled again")
    monkeypatch.setattr(cd, "compile_source", no_compiler)
    assert cd.compile_cached(src, "k", "compute_90") == first  # a later process reads the file
    path.write_bytes(b"")  # an empty file (a crash before any byte was written elsewhere) is not an image
    with pytest.raises(AssertionError, match="compiled again"):
        cd.compile_cached(src, "k", "compute_90")


@needs_nvrtc
def test_an_unwritable_image_cache_only_costs_the_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TILESPARSE_CACHE", str(tmp_path))
    src = 'extern "C" __global__ void k(float *y) { y[threadIdx.x] = 4.0f; }'
    (tmp_path / "nvrtc").write_text("a file where the folder should be")
    assert b".entry k(" in cd.compile_cached(src, "k", "compute_90")


def test_missing_bindings_are_reported(monkeypatch):
    cd.missing.cache_clear()
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    try:
        assert "cuda-bindings is not installed" in cd.missing() and "tilesparse[gpu]" in cd.missing()
    finally:
        cd.missing.cache_clear()


def test_unavailable_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cm.unavailable_reason() == "no CUDA device" and not cm.available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert cm.unavailable_reason() == "Tesla T4 (compute capability 7.5) has no sparse tensor cores (8.0+ needed)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert cm.unavailable_reason() == cd.missing()
    assert cm.unavailable_reason(torch.device("cpu")) == "cpu is not a CUDA device"  # CPU weights on a GPU machine
    assert not cm.available("cpu")


def test_portable_path_is_said_once_per_device(monkeypatch):
    monkeypatch.setattr(ops, "_NOTED", set())
    monkeypatch.setattr(ops, "MMA_CANDIDATES", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(cm, "unavailable_reason", lambda device=None: "Tesla T4 has no sparse tensor cores")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for dev in ("cuda:0", "cuda:0", "cuda:1", "cuda:0"):
            ops._note_portable_path(torch.device(dev))
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 2 and "cuda:0" in msgs[0] and "cuda:1" in msgs[1]
    assert "portable Triton kernels" in msgs[0] and "Tesla T4 has no sparse tensor cores" in msgs[0]


def _without_type_errors(fn):
    """Run a wrapper up to the driver: its arguments must convert (a ``TypeError`` is a bug in the wrapper);
    without a GPU driver the call then stops at loading it, on a GPU it runs (or the driver refuses)."""
    try:
        return fn()
    except cd.CudaError as e:  # the driver's own refusal (on a GPU)
        return e
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "DynamicLibNotFoundError":  # no GPU driver on this machine
            return e
        raise


@pytest.mark.skipif(cd.missing() is not None, reason=str(cd.missing()))
def test_driver_wrappers_convert_their_arguments():
    from cuda.bindings import driver

    res = _without_type_errors(lambda: cd.encode_tensor_map(2, 1 << 20, 64, 16, 128, 32, 16))
    assert isinstance(res, (bytes, Exception)) and (not isinstance(res, bytes) or len(res) == 128)
    kernel = driver.CUkernel(0)
    _without_type_errors(lambda: cd.set_max_dynamic_smem(kernel, 100_000, 0))
    for dependent in (False, True):
        launch = cd.Launcher(kernel, 0, (2, 1, 1), (128, 1, 1), 0, dependent=dependent)
        assert isinstance(_without_type_errors(lambda: launch(0, 1 << 20)), Exception)  # a null kernel never runs
    _without_type_errors(lambda: cd.load_kernel(b"not an image", "k"))


@pytest.mark.skipif(cd.missing() is not None, reason=str(cd.missing()))
def test_prepared_mma_launch_reaches_the_driver(monkeypatch):
    """A v7 launch prepared and called up to ``cuLaunchKernel`` (the kernel handle and stream are stand-ins
    here): its parameter array and the launch arguments convert."""
    from cuda.bindings import driver

    from kernels_testutil import random_layer

    p = random_layer(256, 512, (128, 128), 0.5, 0.1, torch.bfloat16, seed=1)[2]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    monkeypatch.setattr(cd, "load_kernel", lambda image, name: driver.CUkernel(0))
    monkeypatch.setattr(cm, "_compile", lambda key, arch: b"")
    monkeypatch.setattr(cm, "_KERNELS", {})
    launch = cm.prepare(p, 16, True, 4, 1, 2, None, None)
    x, out, bias = torch.randn(16, 512).bfloat16(), torch.empty(16, 256).bfloat16(), torch.randn(256).bfloat16()
    err = _without_type_errors(lambda: launch(x, out, bias))
    assert isinstance(err, Exception)  # no GPU driver / a null kernel: never a TypeError
    assert launch._vals[0].value == x.data_ptr() and launch._vals[2].value == bias.data_ptr()
