"""The few CUDA driver and NVRTC calls the mma kernels need, through NVIDIA's ``cuda-bindings`` package.

* :func:`compile_source` -- NVRTC: CUDA C++ to a cubin for one GPU architecture (``sm_XY``), or to PTX for a
  virtual one (``compute_XY``; what the CPU tests check); :func:`compile_cached` keeps the images on disk, so
  a new process loads a kernel instead of compiling it again.
* :func:`load_kernel` -- a context-independent library (``cuLibraryLoadData``) and its ``CUkernel``: the
  driver loads it into each device's context on that device's first launch, so one handle serves every GPU
  of the process.
* :class:`Launcher` -- ``cuLaunchKernel`` (or ``cuLaunchKernelEx`` with programmatic stream serialization) on
  a torch stream, the kernel parameters given as the address of a ``void*`` array.
* :func:`encode_tensor_map` -- a 2-D ``CUtensorMap`` (tensor copies of sm_90), as its 128 bytes.
* :func:`set_max_dynamic_smem` -- the per-device opt-in for more than 48 KB of dynamic shared memory.

``cuda-bindings`` is optional (``pip install tilesparse[gpu]``); without it :func:`missing` says why the mma
kernels do not run and the Triton kernels serve every layer.
"""

from __future__ import annotations

import functools

_INSTALL = "pip install 'tilesparse[gpu]' (cuda-bindings matching your torch's CUDA major version)"


@functools.cache
def missing() -> str | None:
    """``None`` when NVRTC and the driver API can be used from Python, else the reason (one line)."""
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401
    except ImportError:
        return f"cuda-bindings is not installed; {_INSTALL}"
    try:
        nvrtc.nvrtcVersion()
    except Exception as e:  # noqa: BLE001 - no libnvrtc of the bindings' CUDA version
        return f"NVRTC could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}); {_INSTALL}"
    return None


class CudaError(RuntimeError):
    """A failed driver or NVRTC call, with the call's name and the library's error string."""


def _driver():
    from cuda.bindings import driver
    return driver


def check(result, call: str):
    """Unpack a ``cuda-bindings`` return tuple ``(status, *values)``: raise :class:`CudaError` on an error
    status, else return the value (or tuple of values, or ``None``)."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        try:
            d = _driver()
            name = d.cuGetErrorName(status)[1].decode() if isinstance(status, d.CUresult) else str(status)
        except Exception:  # noqa: BLE001
            name = str(status)
        raise CudaError(f"{call} failed: {name}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


@functools.cache
def supported_archs() -> tuple[int, ...]:
    """The real architectures this NVRTC compiles for (e.g. ``[75, 80, ..., 120]``)."""
    from cuda.bindings import nvrtc
    return tuple(sorted(check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")))


@functools.cache
def target_arch(capability: tuple[int, int]) -> str:
    """NVRTC's ``--gpu-architecture`` for a device: its own ``sm_XY`` when this NVRTC knows it, else PTX for
    the newest architecture it knows (the driver compiles that for the device when loading it)."""
    cc = 10 * capability[0] + capability[1]
    archs = supported_archs()
    return f"sm_{cc}" if cc in archs else f"compute_{max(a for a in archs if a <= cc)}"


def compile_source(source: str, name: str, arch: str, options: tuple[str, ...] = ("-std=c++17",),
                   log: list[str] | None = None) -> bytes:
    """Compile one CUDA C++ translation unit with NVRTC: a cubin for ``arch = "sm_XY"``, PTX for
    ``"compute_XY"``. :class:`CudaError` with NVRTC's log when it does not compile; ``log`` (a list) receives
    the log of a successful compilation (with ``--ptxas-options=-v`` among ``options`` and an ``sm_XY`` target:
    registers, spills and shared memory per kernel)."""
    from cuda.bindings import nvrtc

    prog = check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if int(status) != 0 or log is not None:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            text = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, text), "nvrtcGetProgramLog")
            text = text.rstrip(b"\0").decode(errors="replace").strip()
            if int(status) != 0:
                raise CudaError(f"NVRTC could not compile {name} for {arch}:\n{text}")
            log.append(text)
        ptx = arch.startswith("compute_")
        size = check((nvrtc.nvrtcGetPTXSize if ptx else nvrtc.nvrtcGetCUBINSize)(prog), "nvrtcGet*Size")
        image = b" " * size
        check((nvrtc.nvrtcGetPTX if ptx else nvrtc.nvrtcGetCUBIN)(prog, image), "nvrtcGet*")
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """This NVRTC's ``(major, minor)``."""
    from cuda.bindings import nvrtc
    return check(nvrtc.nvrtcVersion(), "nvrtcVersion")


def image_cache_path(source: str, name: str, arch: str, options: tuple[str, ...]):
    """Where :func:`compile_cached` keeps the image of one compilation: ``<cache>/nvrtc/<name>-<hash>.<ext>``,
    the hash over the source, architecture, options and NVRTC version (any of them changing means a new file)."""
    import hashlib

    from ..paths import cache_dir

    h = hashlib.sha256("\0".join([source, name, arch, *options, repr(nvrtc_version())]).encode()).hexdigest()
    return cache_dir() / "nvrtc" / f"{name}-{h[:24]}.{'ptx' if arch.startswith('compute_') else 'cubin'}"


def compile_cached(source: str, name: str, arch: str, options: tuple[str, ...] = ("-std=c++17",)) -> bytes:
    """:func:`compile_source` through an on-disk cache (:func:`image_cache_path`): an image compiled once on this
    machine is read back by later processes. A cache that cannot be read or written only costs the compile."""
    from ..atomic import atomic_write_bytes

    try:
        path = image_cache_path(source, name, arch, options)
    except OSError:  # no cache folder to be had
        path = None
    if path is not None:
        try:
            image = path.read_bytes()
            if image:
                return image
        except OSError:
            pass
    image = compile_source(source, name, arch, options)
    if path is not None:
        try:
            atomic_write_bytes(image, path)
        except OSError:
            pass
    return image


@functools.cache
def _init() -> None:
    check(_driver().cuInit(0), "cuInit")


def load_kernel(image: bytes, name: str):
    """Load a cubin / PTX image as a context-independent library and return its kernel ``name``
    (``CUkernel``; the library stays loaded for the process)."""
    d = _driver()
    _init()
    lib = check(d.cuLibraryLoadData(image, None, None, 0, None, None, 0), "cuLibraryLoadData")
    return check(d.cuLibraryGetKernel(lib, name.encode()), f"cuLibraryGetKernel({name})")


def set_max_dynamic_smem(kernel, nbytes: int, device_index: int) -> None:
    """Allow ``kernel`` to launch with ``nbytes`` of dynamic shared memory on one device."""
    d = _driver()
    attr = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(d.cuKernelSetAttribute(attr, nbytes, kernel, d.CUdevice(device_index)), "cuKernelSetAttribute")


class Launcher:
    """Launches of one kernel with a fixed grid, block and dynamic shared memory; ``dependent`` launches it as a
    programmatic dependent of the stream's previous kernel (compute capability 9.0+)."""

    def __init__(self, kernel, device_index: int, grid: tuple[int, int, int], block: tuple[int, int, int],
                 smem: int, dependent: bool = False):
        d = _driver()
        self._kernel, self._device, self._grid, self._block, self._smem = kernel, device_index, grid, block, smem
        self._launch = d.cuLaunchKernel
        self._config = None
        if dependent:
            attr = d.CUlaunchAttribute()
            attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            cfg = d.CUlaunchConfig()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
            cfg.sharedMemBytes = smem
            cfg.attrs = [attr]
            cfg.numAttrs = 1
            self._config, self._launch_ex = cfg, d.cuLaunchKernelEx
            self._stream_type = d.CUstream

    def __call__(self, stream: int, params_address: int) -> None:
        """Launch on the CUDA stream with handle ``stream`` (``torch.cuda.Stream.cuda_stream``) of the device,
        the kernel's parameters at ``params_address`` (a ``void*[n]`` array pointing at each value)."""
        res = self._try(stream, params_address)
        if int(res[0]) == _INVALID_CONTEXT:  # a thread that has not used the device yet: bind its context
            _make_current(self._device)
            res = self._try(stream, params_address)
        if int(res[0]) != 0:
            check(res, "cuLaunchKernel")

    def _try(self, stream: int, params_address: int):
        if self._config is None:
            g, b = self._grid, self._block
            res = self._launch(self._kernel, g[0], g[1], g[2], b[0], b[1], b[2], self._smem, stream,
                               params_address, 0)
        else:
            self._config.hStream = self._stream_type(stream)
            res = self._launch_ex(self._config, self._kernel, params_address, 0)
        return res


_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT


def _make_current(device_index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread."""
    d = _driver()
    ctx = check(d.cuDevicePrimaryCtxRetain(d.CUdevice(device_index)), "cuDevicePrimaryCtxRetain")
    check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


TMAP_UINT8, TMAP_UINT16 = 0, 1


def encode_tensor_map(elem_bytes: int, address: int, dim0: int, rows: int, row_stride: int, box0: int,
                      box1: int) -> bytes:
    """The 128-byte ``CUtensorMap`` of a row-major 2-D array of 1- or 2-byte elements (``dim0`` elements per
    row, ``rows`` rows ``row_stride`` bytes apart) copied in boxes of ``box0 x box1``: no interleave, no
    swizzle, 256-byte L2 promotion, zero fill out of bounds."""
    import ctypes

    d = _driver()
    dtype = d.CUtensorMapDataType(TMAP_UINT16 if elem_bytes == 2 else TMAP_UINT8)
    u64, u32 = d.cuuint64_t, d.cuuint32_t  # (the bindings take typed lists, not ints)
    tmap = check(d.cuTensorMapEncodeTiled(
        dtype, 2, address, [u64(dim0), u64(rows)], [u64(row_stride)], [u32(box0), u32(box1)], [u32(1), u32(1)],
        d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE,
        d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), "cuTensorMapEncodeTiled")
    return ctypes.string_at(tmap.getPtr(), 128)
