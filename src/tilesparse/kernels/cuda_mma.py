"""The v7 / v9 decode kernels: the hybrid linear on sparse tensor cores (``mma.sp``), CUDA C++ compiled at
run time.

Triton has no sparse MMA, so these kernels are CUDA C++ (``csrc/hybrid_mma.cu`` v7, ``csrc/hybrid_mma9.cu`` v9,
helpers in ``csrc/mma_common.cuh``) compiled by NVRTC through torch (the two steps of
``torch.cuda._compile_kernel``, ``torch.cuda._utils._nvrtc_compile`` and ``_cuda_load_module``: NVRTC ships with
torch's CUDA wheels; no ``nvcc``) for the current GPU and cached per configuration.
2:4 tiles go to ``mma.sp.m16n8k32`` as stored (the format's 2-bit positions *are* the instruction's
metadata), dense tiles to ``mma.m16n8k16``; see the sources' headers. v7 stages x per batch of steps; v9
(sm_90) is a persistent kernel whose producer warp moves work items (:func:`item_table`) into shared-memory
stages by tensor copies (:func:`tensor_maps`) for its consumer warps.

Requirements (else :func:`mma_supported` is false and the Triton kernels serve the layer): a CUDA device
of compute capability 8.0+, 16-bit weights, ``tile_cols`` a power of two >= 64, ``tile_rows % 16 == 0``,
``in_features % 64 == 0``, ``out_features % 16 == 0``, 16-byte aligned value arrays. It does not run on
the Triton CPU interpreter: it is checked on the GPU by ``benchmarks/kernel_speed.py --check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

from ..settings import setting
from .format import PackedHybrid

MAX_TOKENS = 64
MAX_STEPS = 512  # v7: 64-column steps per block (csrc/hybrid_mma.cu)


@dataclass(frozen=True)
class MmaKey:
    bf16: bool
    noct: int
    warps: int
    sb: int
    bias: bool
    ver: int = 7
    spb: int = 0  # v9: steps per work item
    probe: bool = False  # v9: per-block timeline output (benchmarks/mma_timeline.py)
    nst: int = 0  # v9: shared-memory stages (``sb`` is unused, 1)

    @property
    def name(self) -> str:
        v = ""
        if self.ver == 9:
            v = f"_p{self.spb}_n{self.nst}" + ("_probe" if self.probe else "")
        tag = {7: "", 9: "9"}[self.ver]
        return (f"hybrid_mma{tag}_{'bf16' if self.bf16 else 'f16'}_o{self.noct}"
                f"_w{self.warps}_s{self.sb}{v}{'_b' if self.bias else ''}")


_SOURCES: dict[str, str] = {}
_KERNELS: dict = {}


def source(name: str = "hybrid_mma.cu") -> str:
    """One CUDA C++ file of ``csrc`` (without the configuration macros)."""
    if name not in _SOURCES:
        _SOURCES[name] = resources.files("tilesparse.kernels").joinpath(f"csrc/{name}").read_text()
    return _SOURCES[name]


def configured_source(key: MmaKey) -> str:
    """The kernel's source with the macros of one configuration and the shared helpers prepended."""
    macros = [("DT_BF16", int(key.bf16)), ("NOCT", key.noct), ("WARPS", key.warps), ("SB", key.sb),
              ("HAS_BIAS", int(key.bias)), ("KNAME", key.name)]
    if key.ver == 9:
        macros += [("SPB", key.spb), ("NST", key.nst), ("PROBE", int(key.probe))]
    head = "".join(f"#define {k} {v}\n" for k, v in macros)
    body = {7: "hybrid_mma.cu", 9: "hybrid_mma9.cu"}[key.ver]
    return head + source("mma_common.cuh") + source(body)


def v9_available() -> bool:
    """True when the v9 kernel can run: a CUDA device of compute capability 9.0+ (bulk copies, mbarrier
    transaction counts)."""
    return available() and torch.cuda.get_device_capability()[0] >= 9


def available() -> bool:
    """True when a CUDA device of compute capability 8.0+ and torch's runtime compiler are present."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def kernel(key: MmaKey):
    """The compiled kernel of one configuration (NVRTC, once per process)."""
    k = _KERNELS.get(key)
    return k if k is not None else _load(key, _compile(key))


def _compile(key: MmaKey) -> tuple:
    """NVRTC: ``(binary, mangled name)`` of one configuration (what ``torch.cuda._compile_kernel`` does first)."""
    from torch.cuda._utils import _nvrtc_compile
    res = _nvrtc_compile(configured_source(key), key.name, nvcc_options=["-std=c++17"])
    return res if isinstance(res, tuple) else (res, key.name)


def _load(key: MmaKey, binary: tuple):
    """Load a compiled configuration into the current context and cache its kernel."""
    from torch.cuda._utils import _cuda_load_module
    mod = _cuda_load_module(binary[0], [binary[1]])
    k = _KERNELS[key] = mod[binary[1]] if isinstance(mod, dict) else getattr(mod, binary[1])
    return k


def make_key(bf16: bool, M: int, warps: int, sb: int, bias: bool, ver: int, spb: int,
             probe: bool = False) -> MmaKey:
    """The compiled configuration that :func:`launch` uses for these arguments (``sb`` is v9's stage count)."""
    v9 = ver == 9
    return MmaKey(bf16, octets(M), warps, 1 if v9 else sb, bias, ver, spb if v9 else 0, probe, sb if v9 else 0)


def precompile(keys, threads: int = 8) -> int:
    """Compile the kernels of ``keys`` that are not compiled yet, NVRTC in ``threads`` threads (it releases the
    GIL; one kernel takes about a second), the modules loaded in this thread; returns how many were compiled."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [k for k in dict.fromkeys(keys) if k not in _KERNELS]
    if not todo:
        return 0
    torch.cuda.init()

    def build(k):  # a failure is left to kernel(), which raises it when the configuration is used
        try:
            return _compile(k)
        except Exception:  # noqa: BLE001
            return None

    with ThreadPoolExecutor(max(1, threads)) as ex:
        binaries = list(ex.map(build, todo))
    for k, b in zip(todo, binaries):
        if b is not None:
            _load(k, b)
    return sum(b is not None for b in binaries)


def _aligned(t: torch.Tensor, a: int) -> bool:
    return t.numel() == 0 or t.data_ptr() % a == 0


def mma_supported(packed: PackedHybrid) -> bool:
    """True when the v7 kernel can run this layer (see the module docstring)."""
    TC = packed.tile_cols
    return (packed.dtype in (torch.bfloat16, torch.float16) and packed.device.type == "cuda"
            and TC >= 64 and TC & (TC - 1) == 0 and packed.tile_rows % 16 == 0
            and packed.in_features % 64 == 0 and packed.out_features % 16 == 0
            and _aligned(packed.sp_vals, 16) and _aligned(packed.dn_vals, 16) and _aligned(packed.sp_meta, 8)
            and max(packed.sp_vals.numel(), packed.dn_vals.numel()) < 2 ** 31)


def octets(M: int) -> int:
    """Token octets the kernel is compiled for: ``ceil(M / 8)`` rounded up to 1, 2, 4 or 8."""
    o = 1
    while o * 8 < M:
        o *= 2
    return o


def step_table(packed: PackedHybrid) -> torch.Tensor:
    """The layer's step table (built once, cached on ``packed``; read by :func:`item_table`): int32 ``[R, S]``
    on the CPU, entry ``[r, s]`` = the first input column of tile-row ``r``'s ``s``-th 64-column step (its 2:4
    steps first, then its dense steps, in the order of the stored values); zeros past a row's last step; ``S``
    = the most steps of any tile-row (at least 1)."""
    tab = packed.__dict__.get("_mma_steps")
    if tab is not None:
        return tab
    TC = packed.tile_cols
    info = packed.row_info.cpu()
    lens = [(int(info[r, 0]) // 64, int(info[r, 5]) // 64) for r in range(packed.grid.n_rows)]
    S = max([1] + [a + b for a, b in lens])
    tab = torch.zeros(packed.grid.n_rows, S, dtype=torch.int32)
    sp_ptr, sp_cols = packed.sp_ptr.cpu(), packed.sp_cols.cpu()
    dn_ptr, dn_cols = packed.dn_ptr.cpu(), packed.dn_cols.cpu()
    for r, (n_sp, n_dn) in enumerate(lens):
        parts = []
        for n, ptr, cols in ((n_sp, sp_ptr, sp_cols), (n_dn, dn_ptr, dn_cols)):
            pos = torch.arange(n, dtype=torch.int64) * 64
            parts.append(cols[int(ptr[r]) + pos // TC].to(torch.int64) * TC + pos % TC)
        row = torch.cat(parts)
        tab[r, :row.numel()] = row.to(torch.int32)
    packed.__dict__["_mma_steps"] = tab
    return tab


V9_SMEM = 227 * 1024  # v9: dynamic shared memory a block may take (sm_90)


def v9_smem(spb: int, noct: int, warps: int, nst: int) -> int:
    """v9's dynamic shared memory: ``nst`` stages of one work item's weights (``16 * warps`` rows of ``spb``
    64-column steps: dense values, or 2:4 values + metadata) and x (``8 * noct`` tokens of ``spb`` steps,
    padded); see ``hybrid_mma9.cu``."""
    br = 16 * warps
    return nst * (br * spb * 128 + br * spb * 8 + 8 * noct * (128 * spb + 16))


V9_MAX_ITEMS = 64  # items per block (hybrid_mma9.cu MAX_ITEMS: the block's item-table rows in shared memory)
V9_STATIC_SMEM = V9_MAX_ITEMS * 4 * 20 + 512  # its static shared memory (at most), for v9_fits


def v9_fits(spb: int, noct: int, warps: int, nst: int) -> bool:
    """Whether a v9 configuration fits: 2, 4, 8 or 16 steps per item (whole tensor-copy boxes, 16-byte
    metadata rows), at least two stages, and its stages in shared memory."""
    return spb in (2, 4, 8, 16) and nst >= 2 and v9_smem(spb, noct, warps, nst) + V9_STATIC_SMEM <= V9_SMEM


def v9_blocks_per_sm(spb: int, noct: int, warps: int, nst: int) -> int:
    """v9 blocks that share one SM's 228 KB of shared memory (1 KB of it reserved per block)."""
    return max(1, (228 * 1024) // (v9_smem(spb, noct, warps, nst) + V9_STATIC_SMEM + 1024))


def item_table(packed: PackedHybrid, spb: int) -> tuple[torch.Tensor, int]:
    """v9's work items per tile-row (built once per ``spb``, cached on ``packed``): int32 ``[R, split, 4 + spb]``,
    row ``[r, j]`` = ``(kind, steps, first step of its kind, 0, input column of each step)``, kind 1 = 2:4; a
    tile-row's 2:4 steps and its dense steps are cut into items of ``spb`` steps, and the two lists are
    interleaved (2:4, dense, 2:4, ...: a range of items then carries both kinds' bytes); ``split`` = the most
    items of any tile-row (shorter rows end with empty items)."""
    cache = packed.__dict__.setdefault("_mma_v9", {})
    if ("items", spb) in cache:
        return cache[("items", spb)]
    tab = step_table(packed)
    info = packed.row_info.cpu()
    rows = []
    for r in range(packed.grid.n_rows):
        n_sp, n_dn = int(info[r, 0]) // 64, int(info[r, 5]) // 64
        kinds = []
        for kind, n, base in ((1, n_sp, 0), (0, n_dn, n_sp)):
            kinds.append([])
            for k0 in range(0, n, spb):
                m = min(spb, n - k0)
                cols = tab[r, base + k0: base + k0 + m].tolist()
                kinds[-1].append([kind, m, k0, 0] + cols + [0] * (spb - m))
        sp, dn = kinds
        its = [it for pair in zip(sp, dn) for it in pair] + sp[len(dn):] + dn[len(sp):]
        rows.append(its)
    split = max(1, max(len(its) for its in rows))
    out = torch.zeros(len(rows), split, 4 + spb, dtype=torch.int32)
    for r, its in enumerate(rows):
        if its:
            out[r, :len(its)] = torch.tensor(its, dtype=torch.int32)
    res = (out.to(packed.device), split)
    cache[("items", spb)] = res
    return res


# v9: an item's fixed cost in weight-byte equivalents, for block_ranges. A large cost gives ranges of equal item
# counts, which were faster than ranges of equal bytes (2 KB per item) in every H200 decode cell measured: a
# block's time follows its item count more than its bytes.
V9_ITEM_COST = 1 << 20


def block_ranges(packed: PackedHybrid, spb: int, br: int, blocks: int, item_cost: int | None = None) -> torch.Tensor:
    """v9's item range per block (cached on ``packed``): int32 ``[blocks + 1]`` cutting the chunk-major item
    list into ``blocks`` contiguous ranges of about equal cost: weight bytes (a 2:4 step of a row costs 72
    bytes, a dense one 128) plus ``item_cost`` (default :data:`V9_ITEM_COST`) per item."""
    item_cost = V9_ITEM_COST if item_cost is None else item_cost
    cache = packed.__dict__.setdefault("_mma_v9", {})
    hit = cache.get(("ranges", spb, br, blocks, item_cost))
    if hit is not None:
        return hit
    items, split = item_table(packed, spb)
    it = items.cpu()
    R, TR, N = packed.grid.n_rows, packed.tile_rows, packed.out_features
    cpt = TR // br
    step_bytes = torch.where(it[:, :, 0] == 1, 72, 128) * it[:, :, 1]  # [R, split], per row
    rows = torch.tensor([[max(0, min(br, min(TR, N - r * TR) - b * br)) for b in range(cpt)] for r in range(R)])
    cost = (rows[:, :, None] * step_bytes[:, None, :] + item_cost).reshape(-1).double()  # chunk-major
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), cost.cumsum(0)])
    targets = cum[-1] * torch.arange(blocks + 1, dtype=torch.float64) / blocks
    bounds = torch.searchsorted(cum, targets).clamp(max=cost.numel())
    bounds[0], bounds[-1] = 0, cost.numel()
    if int((bounds[1:] - bounds[:-1]).max()) > V9_MAX_ITEMS:
        raise ValueError(f"mma kernel v9: more than {V9_MAX_ITEMS} items per block; use more steps per item")
    res = bounds.to(torch.int32).to(packed.device)
    cache[("ranges", spb, br, blocks, item_cost)] = res
    return res


def v9_plan(packed: PackedHybrid, spb: int, warps: int, noct: int, nst: int) -> tuple[int, int, torch.Tensor]:
    """v9's launch: (dynamic shared memory, blocks, item ranges); ``ValueError`` when a block would get more
    than :data:`V9_MAX_ITEMS` items."""
    split = item_table(packed, spb)[1]
    smem = v9_smem(spb, noct, warps, nst)
    per_sm = v9_blocks_per_sm(spb, noct, warps, nst)
    n_chunks = packed.grid.n_rows * (packed.tile_rows // (16 * warps))
    grid = min(n_chunks * split, _sm_count(packed.device) * per_sm)
    return smem, grid, block_ranges(packed, spb, 16 * warps, grid)


_TMAP_UINT8, _TMAP_UINT16 = 0, 1


def _encode_tmap(buf, ptr: int, elem: int, dim0: int, rows: int, stride: int, box0: int, box1: int) -> None:
    """Fill the 128-byte CUtensorMap ``buf`` for a row-major 2-D array (driver call, no swizzle, zero fill)."""
    import ctypes
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library
    lib = _get_gpu_runtime_library()
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    _check_cuda(lib.cuTensorMapEncodeTiled(
        buf, ctypes.c_int(_TMAP_UINT16 if elem == 2 else _TMAP_UINT8), u32(2), ctypes.c_void_p(ptr),
        (u64 * 2)(dim0, rows), (u64 * 1)(stride), (u32 * 2)(box0, box1), (u32 * 2)(1, 1),
        ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(3), ctypes.c_int(0)))  # no interleave / swizzle, L2 256B


def tensor_maps(packed: PackedHybrid, spb: int, br: int) -> torch.Tensor:
    """v9's tensor maps (built once per ``(spb, br)``, cached on ``packed``): uint8 ``[R * 384]`` on the device,
    per tile-row the maps of its 2:4 values (box ``spb * 32 x br``), metadata (``spb * 8 x br``) and dense
    values (``min(spb, 4) * 64 x br``); zeros where the tile-row has no tile of that kind."""
    import ctypes
    cache = packed.__dict__.setdefault("_mma_v9", {})
    ptrs = (packed.sp_vals.data_ptr(), packed.sp_meta.data_ptr(), packed.dn_vals.data_ptr())
    hit = cache.get(("tmaps", spb, br))
    if hit is not None and hit[0] == ptrs:
        return hit[1]
    info = packed.row_info.cpu()
    R, TR, N = packed.grid.n_rows, packed.tile_rows, packed.out_features
    host = (ctypes.c_ubyte * (R * 384))()
    for r in range(R):
        sp_len, sp_off, sp_stride, mt_off, mt_stride, dn_len, dn_off, dn_stride = info[r].tolist()
        rows = min(TR, N - r * TR)
        base = ctypes.addressof(host) + r * 384
        if sp_len:
            _encode_tmap(ctypes.c_void_p(base), ptrs[0] + 2 * sp_off, 2, sp_len // 2, rows, 2 * sp_stride, 32 * spb, br)
            _encode_tmap(ctypes.c_void_p(base + 128), ptrs[1] + mt_off, 1, sp_len // 8, rows, mt_stride, 8 * spb, br)
        if dn_len:
            _encode_tmap(ctypes.c_void_p(base + 256), ptrs[2] + 2 * dn_off, 2, dn_len, rows, 2 * dn_stride,
                         64 * min(spb, 4), br)
    maps = torch.frombuffer(bytearray(host), dtype=torch.uint8).to(packed.device)
    cache[("tmaps", spb, br)] = (ptrs, maps)
    return maps


def _allow_smem(k, nbytes: int) -> None:
    """Let compiled kernel ``k`` launch with ``nbytes`` of dynamic shared memory (> 48 KB needs an opt-in)."""
    if nbytes < 48 * 1024 or getattr(k, "_tilesparse_smem", 0) >= nbytes:
        return
    if hasattr(k, "set_shared_memory_config"):
        k.set_shared_memory_config(nbytes)
    else:  # older torch: the driver attribute directly (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8)
        from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library
        _check_cuda(_get_gpu_runtime_library().cuFuncSetAttribute(k.func, 8, nbytes))
    k._tilesparse_smem = nbytes


_LAUNCH_ATTR_PDL = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_LAUNCH_TYPES: list = []


def _launch_types():
    """ctypes mirrors of the driver's ``CUlaunchAttribute`` (id, padding, 64-byte value union) and
    ``CUlaunchConfig``."""
    if not _LAUNCH_TYPES:
        import ctypes

        class Attr(ctypes.Structure):
            _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]

        class Config(ctypes.Structure):
            _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                        ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(Attr)), ("n_attrs", ctypes.c_uint)]

        _LAUNCH_TYPES.extend([Attr, Config])
    return _LAUNCH_TYPES


def pdl_enabled(device=None) -> bool:
    """Whether the mma kernels are launched as programmatic dependents (``griddepcontrol``, compute capability
    9.0+, opt-in: ``TILESPARSE_PDL=1``): a kernel's blocks may then start while the kernel before it in the
    stream finishes, and each waits for it (``grid_dep_wait`` in ``mma_common.cuh``) before reading x or
    writing its outputs; v9 copies its first stages' weights before that wait. Off by default: on the H200 it
    saved 1-1.5 us per v9 call after a memory-bound kernel but made batch-16 decode of a 7B model 0.3-0.9 %
    slower (``docs/KERNELS.md``, measured results)."""
    return setting("pdl") and torch.cuda.get_device_capability(device)[0] >= 9


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(x2: torch.Tensor, packed: PackedHybrid, bias, out: torch.Tensor, warps: int, split: int, sb: int,
           ws: torch.Tensor | None, cnt: torch.Tensor | None, ver: int = 7, spb: int = 0,
           probe: torch.Tensor | None = None) -> None:
    """Run the kernel (``ver`` 7 or 9) on ``x2 [M, K]`` (``M <= 64``) into ``out [M, N]``; ``warps * 16`` must
    divide ``tile_rows``; ``split > 1`` needs ``ws`` (fp32, ``>= M * N``, zero) and ``cnt`` (int32, ``>=``
    number of row chunks, zero), which the kernel leaves zero. v9: ``spb`` = steps per work item, ``split`` =
    the layer's items per row chunk (:func:`item_table`); it reads ``sb`` as its number of shared-memory
    stages and needs sm_90; ``probe`` (int64, ``4 + 3 * V9_MAX_ITEMS`` per block) receives each block's
    timeline (the probe build of the kernel). One-off: :func:`prepare` once and call the result for repeated
    launches of one layer."""
    prepare(packed, x2.shape[0], bias is not None, warps, split, sb, ws, cnt, ver, spb, probe)(x2, out, bias)


def prepare(packed: PackedHybrid, M: int, has_bias: bool, warps: int, split: int, sb: int,
            ws: torch.Tensor | None, cnt: torch.Tensor | None, ver: int = 7, spb: int = 0,
            probe: torch.Tensor | None = None) -> "MmaLaunch":
    """Check one configuration of the kernel against the layer and ``M`` tokens (arguments as :func:`launch`;
    ``ValueError`` where they do not fit), compile it, and return the launch with everything but x, out and
    bias bound (:class:`MmaLaunch`)."""
    N = packed.out_features
    if M > MAX_TOKENS:
        raise ValueError(f"mma kernel: {M} tokens > {MAX_TOKENS}")
    if ver not in (7, 9):
        raise ValueError(f"mma kernel: no version {ver}")
    br = 16 * warps
    if packed.tile_rows % br:
        raise ValueError(f"mma kernel: {br} rows per block do not divide tile_rows={packed.tile_rows}")
    key = make_key(packed.dtype == torch.bfloat16, M, warps, sb, has_bias, ver, spb, probe is not None)
    if probe is not None and ver == 7:
        raise ValueError("mma kernel: the timeline probe is v9 only")
    if ver == 7 and -(-packed.in_features // 64) > MAX_STEPS * split:
        raise ValueError(f"mma kernel: split={split} leaves more than {MAX_STEPS} steps per block")
    if ver == 9:  # sb = stages; split = the item table's items per chunk
        if not v9_fits(spb, key.noct, warps, sb) or not _aligned(packed.sp_meta, 16):
            raise ValueError(f"mma kernel v9: spb={spb}, stages={sb}, warps={warps} do not fit {key.noct} token "
                             "octets (or the metadata is not 16-byte aligned)")
        items, v9_split = item_table(packed, spb)
        if split != v9_split:
            raise ValueError(f"mma kernel v9: split={split}, but the layer has {v9_split} items per row chunk")
    cpt = packed.tile_rows // br
    n_chunks = packed.grid.n_rows * cpt
    if split > 1 and (ws is None or cnt is None or ws.numel() < M * N or cnt.numel() < n_chunks):
        raise ValueError("mma kernel: split > 1 needs ws [M*N] and cnt [row chunks]")
    # x, out, bias, ws, cnt: bound per call (0 until then; without bias / split the kernel gets out's pointer)
    common = [0, 0, 0, ws if split > 1 else 0, cnt if split > 1 else 0, packed.sp_vals, packed.sp_meta,
              packed.dn_vals]
    extra = [probe] if probe is not None else []
    k = kernel(key)
    if ver == 9:
        smem, grid, ranges = v9_plan(packed, spb, warps, key.noct, sb)
        _allow_smem(k, smem)
        args = common[:5] + [tensor_maps(packed, spb, br), items, ranges, M, N, 0, 0, split, cpt,
                             packed.tile_rows] + extra
        return MmaLaunch(k, (grid, 1, 1), (32 * (warps + 1), 1, 1), smem, args, 10, M, 16, split > 1)
    args = common + [packed.sp_cols, packed.sp_ptr, packed.dn_cols, packed.dn_ptr, packed.row_info,
                     M, N, 0, 0, split, cpt, packed.tile_rows, packed.tile_cols.bit_length() - 1]
    return MmaLaunch(k, (n_chunks, split, 1), (32 * warps, 1, 1), 0, args, 15, M, 4, split > 1)


_LAUNCHERS: list = []


def _launchers():
    """``cuLaunchKernel`` and ``cuLaunchKernelEx`` with their own ctypes prototypes (torch's handles untouched)."""
    if not _LAUNCHERS:
        import ctypes

        from torch.cuda._utils import _get_gpu_runtime_library
        lib, vp, u = _get_gpu_runtime_library(), ctypes.c_void_p, ctypes.c_uint
        _LAUNCHERS.append(ctypes.CFUNCTYPE(ctypes.c_int, vp, u, u, u, u, u, u, u, vp, vp, vp)(("cuLaunchKernel", lib)))
        _LAUNCHERS.append(ctypes.CFUNCTYPE(ctypes.c_int, vp, vp, vp, vp)(("cuLaunchKernelEx", lib)))
    return _LAUNCHERS


class MmaLaunch:
    """A prepared launch of one mma kernel configuration for one layer and token count (:func:`prepare`): the
    kernel parameters live in a ctypes array built once, and a call only writes the pointers of x, out and
    bias and x's row stride into it before ``cuLaunchKernel`` -- a few microseconds of host time instead of the
    checks, table look-ups and argument conversion of a full :func:`launch`."""

    def __init__(self, k, grid: tuple, block: tuple, smem: int, args: list, i_sx: int, M: int, align: int,
                 split_k: bool):
        import ctypes
        self._args = args  # (keeps the bound tensors alive)
        self._vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else
                      (ctypes.c_void_p(0) if i < 5 else ctypes.c_int(a)) for i, a in enumerate(args)]
        self._params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(v) for v in self._vals])
        self._k, self._grid, self._block, self._smem = k, grid, block, smem
        self._i_sx, self.M, self._align, self._split_k = i_sx, M, align, split_k

    def __call__(self, x2: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """``out [M, N] = x2 [M, K] @ W^T (+ bias)`` on the current stream (bias as prepared: given or not)."""
        import ctypes
        if x2.shape[0] != self.M:
            raise ValueError(f"mma kernel: prepared for {self.M} tokens, got {x2.shape[0]}")
        a = self._align  # v9 copies runs of 128 bytes, v7 copies 4 bytes
        if x2.stride(1) != 1 or x2.stride(0) % (a // 2) or x2.data_ptr() % a:
            x2 = x2.contiguous()
        v = self._vals
        o = out.data_ptr()
        v[0].value, v[1].value = x2.data_ptr(), o
        v[2].value = bias.data_ptr() if bias is not None else o
        if not self._split_k:
            v[3].value = v[4].value = o
        v[self._i_sx].value, v[self._i_sx + 1].value = x2.stride(0), out.stride(0)
        stream = torch.cuda.current_stream().cuda_stream
        g, b = self._grid, self._block
        plain, ex = _launchers()
        if pdl_enabled():  # (reads the environment first: the capability only when asked for)
            Attr, Config = _launch_types()
            attr = Attr(id=_LAUNCH_ATTR_PDL)
            attr.value[0] = 1  # programmaticStreamSerializationAllowed
            cfg = Config(grid=(ctypes.c_uint * 3)(*g), block=(ctypes.c_uint * 3)(*b), smem=self._smem,
                         stream=stream, attrs=ctypes.pointer(attr), n_attrs=1)
            res = ex(ctypes.addressof(cfg), self._k.func, self._params, None)
        else:
            res = plain(self._k.func, g[0], g[1], g[2], b[0], b[1], b[2], self._smem, stream, self._params, None)
        if res:
            from torch.cuda._utils import _check_cuda
            _check_cuda(res)
