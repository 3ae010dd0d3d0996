"""The v7 / v9 decode kernels: the hybrid linear on sparse tensor cores (``mma.sp``), CUDA C++ compiled at
run time.

Triton has no sparse MMA, so these kernels are CUDA C++ (``csrc/hybrid_mma.cu`` v7, ``csrc/hybrid_mma9.cu`` v9,
helpers in ``csrc/mma_common.cuh``) compiled at run time by NVRTC (no ``nvcc``) and launched through the driver
API, both by NVIDIA's ``cuda-bindings`` (:mod:`.cuda_driver`). A configuration is compiled once per process and
GPU architecture and loaded as a context-independent library, so its kernel runs on every device of that
architecture.
2:4 tiles go to ``mma.sp.m16n8k32`` as stored (the format's 2-bit positions *are* the instruction's
metadata), dense tiles to ``mma.m16n8k16``; see the sources' headers. v7 stages x per batch of steps; v9
(sm_90) is a persistent kernel whose producer warp moves work items (:func:`item_table`) into shared-memory
stages by tensor copies (:func:`tensor_maps`) for its consumer warps.

Requirements (else :func:`available` / :func:`mma_supported` is false and the Triton kernels serve the layer):
``cuda-bindings`` installed, a CUDA device of compute capability 8.0+, 16-bit weights, ``tile_cols`` a power
of two >= 64, ``tile_rows % 16 == 0``, ``in_features % 64 == 0``, ``out_features % 16 == 0``, 16-byte aligned
value arrays. It does not run on
the Triton CPU interpreter: it is checked on the GPU by ``benchmarks/kernel_speed.py --check``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import torch

from ..settings import setting
from . import cuda_driver as _cd
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


def configured_source(key) -> str:
    """The kernel's source with the macros of one configuration and the shared helpers prepended. A key of
    another kernel on these helpers (:class:`.cuda_mma_q4.MmaQ4Key`) builds its own (``key.configured_source()``),
    so :func:`kernel`, :func:`precompile` and :func:`compiled` serve it too."""
    if not isinstance(key, MmaKey):
        return key.configured_source()
    macros = [("DT_BF16", int(key.bf16)), ("NOCT", key.noct), ("WARPS", key.warps), ("SB", key.sb),
              ("HAS_BIAS", int(key.bias)), ("KNAME", key.name)]
    if key.ver == 9:
        macros += [("SPB", key.spb), ("NST", key.nst), ("PROBE", int(key.probe))]
    head = "".join(f"#define {k} {v}\n" for k, v in macros)
    body = {7: "hybrid_mma.cu", 9: "hybrid_mma9.cu"}[key.ver]
    return head + source("mma_common.cuh") + source(body)


def v9_available(device=None) -> bool:
    """True when the v9 kernel can run on ``device`` (default: the current one): the v7 conditions and compute
    capability 9.0+ (bulk copies, mbarrier transaction counts)."""
    return available(device) and torch.cuda.get_device_capability(device)[0] >= 9


def unavailable_reason(device=None) -> str | None:
    """``None`` when the mma kernels can run on ``device`` (default: the current CUDA device), else why not
    (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if device is not None and torch.device(device).type != "cuda":
        return f"{torch.device(device)} is not a CUDA device"
    cc = torch.cuda.get_device_capability(device)
    if cc[0] < 8:
        return (f"{torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]}) has no sparse tensor "
                "cores (8.0+ needed)")
    return _cd.missing()


def available(device=None) -> bool:
    """True when the mma kernels can run on ``device`` (default: the current CUDA device)."""
    return unavailable_reason(device) is None


def _arch(device=None) -> str:
    return _cd.target_arch(torch.cuda.get_device_capability(device))


def kernel(key: MmaKey, device=None):
    """The loaded kernel of one configuration for ``device``'s architecture (compiled once per process)."""
    arch = _arch(device)
    k = _KERNELS.get((key, arch))
    return k if k is not None else _load(key, arch, _compile(key, arch))


def _compile(key: MmaKey, arch: str) -> bytes:
    """NVRTC: the image of one configuration for ``arch`` (``sm_XY`` cubin, or ``compute_XY`` PTX), read from
    the on-disk image cache when an earlier process compiled it (:func:`.cuda_driver.compile_cached`)."""
    return _cd.compile_cached(configured_source(key), key.name, arch)


def _load(key: MmaKey, arch: str, image: bytes):
    """Load a compiled configuration (context-independent) and cache its kernel."""
    k = _KERNELS[(key, arch)] = _cd.load_kernel(image, key.name)
    return k


def compiled(key: MmaKey, device=None) -> bool:
    """Whether ``key`` is compiled and loaded for ``device``'s architecture."""
    return (key, _arch(device)) in _KERNELS


def make_key(bf16: bool, M: int, warps: int, sb: int, bias: bool, ver: int, spb: int,
             probe: bool = False) -> MmaKey:
    """The compiled configuration that :func:`launch` uses for these arguments (``sb`` is v9's stage count)."""
    v9 = ver == 9
    return MmaKey(bf16, octets(M), warps, 1 if v9 else sb, bias, ver, spb if v9 else 0, probe, sb if v9 else 0)


def precompile(keys, threads: int = 8, device=None) -> int:
    """Compile the kernels of ``keys`` that are not compiled for ``device``'s architecture yet, NVRTC in
    ``threads`` threads (it releases the GIL; one kernel takes about a second); returns how many were
    compiled."""
    from concurrent.futures import ThreadPoolExecutor

    torch.cuda.init()
    arch = _arch(device)
    todo = [k for k in dict.fromkeys(keys) if (k, arch) not in _KERNELS]
    if not todo:
        return 0

    def build(k):  # a failure is left to kernel(), which raises it when the configuration is used
        try:
            return _compile(k, arch)
        except Exception:  # noqa: BLE001
            return None

    with ThreadPoolExecutor(max(1, threads)) as ex:
        images = list(ex.map(build, todo))
    for k, image in zip(todo, images):
        if image is not None:
            _load(k, arch, image)
    return sum(image is not None for image in images)


def _aligned(t: torch.Tensor, a: int) -> bool:
    return t.numel() == 0 or t.data_ptr() % a == 0


def mma_supported(packed: PackedHybrid) -> bool:
    """True when the v7 kernel can run this layer on its device (see the module docstring)."""
    TC = packed.tile_cols
    return (packed.dtype in (torch.bfloat16, torch.float16) and packed.device.type == "cuda"
            and available(packed.device)
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


def tensor_maps(packed: PackedHybrid, spb: int, br: int) -> torch.Tensor:
    """v9's tensor maps (built once per ``(spb, br)``, cached on ``packed``): uint8 ``[R * 384]`` on the device,
    per tile-row the maps of its 2:4 values (box ``spb * 32 x br``), metadata (``spb * 8 x br``) and dense
    values (``min(spb, 4) * 64 x br``); zeros where the tile-row has no tile of that kind."""
    cache = packed.__dict__.setdefault("_mma_v9", {})
    ptrs = (packed.sp_vals.data_ptr(), packed.sp_meta.data_ptr(), packed.dn_vals.data_ptr())
    hit = cache.get(("tmaps", spb, br))
    if hit is not None and hit[0] == ptrs:
        return hit[1]
    info = packed.row_info.cpu()
    R, TR, N = packed.grid.n_rows, packed.tile_rows, packed.out_features
    host = bytearray(R * 384)
    for r in range(R):
        sp_len, sp_off, sp_stride, mt_off, mt_stride, dn_len, dn_off, dn_stride = info[r].tolist()
        rows = min(TR, N - r * TR)
        base = r * 384
        if sp_len:
            host[base:base + 128] = _cd.encode_tensor_map(2, ptrs[0] + 2 * sp_off, sp_len // 2, rows, 2 * sp_stride,
                                                          32 * spb, br)
            host[base + 128:base + 256] = _cd.encode_tensor_map(1, ptrs[1] + mt_off, sp_len // 8, rows, mt_stride,
                                                                8 * spb, br)
        if dn_len:
            host[base + 256:base + 384] = _cd.encode_tensor_map(2, ptrs[2] + 2 * dn_off, dn_len, rows,
                                                                2 * dn_stride, 64 * min(spb, 4), br)
    maps = torch.frombuffer(host, dtype=torch.uint8).to(packed.device)
    cache[("tmaps", spb, br)] = (ptrs, maps)
    return maps


_SMEM_ALLOWED: dict = {}


def _allow_smem(k, nbytes: int, device_index: int) -> None:
    """Let kernel ``k`` launch with ``nbytes`` of dynamic shared memory on one device (> 48 KB needs an
    opt-in per device)."""
    key = (int(k), device_index)
    if nbytes < 48 * 1024 or _SMEM_ALLOWED.get(key, 0) >= nbytes:
        return
    _cd.set_max_dynamic_smem(k, nbytes, device_index)
    _SMEM_ALLOWED[key] = nbytes


def pdl_enabled(device=None) -> bool:
    """Whether the mma kernels are launched as programmatic dependents (``griddepcontrol``, compute capability
    9.0+, opt-in: ``TILESPARSE_PDL=1``): a kernel's blocks may then start while the kernel before it in the
    stream finishes, and each waits for it (``grid_dep_wait`` in ``mma_common.cuh``) before reading x or
    writing its outputs; v9 copies its first stages' weights before that wait. Off by default: on the H200 it
    saved 1-1.5 us per v9 call after a memory-bound kernel but made batch-16 decode of a 7B model 0.3-0.9 %
    slower (``docs/KERNELS.md``, measured results)."""
    return setting("pdl") and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def current_stream_handle():
    """``fn(device_index) -> int``: the handle (``cudaStream_t``) of the device's current torch stream, as
    ``torch.cuda.current_stream(i).cuda_stream`` gives it. Triton's driver query is used where Triton is
    installed: it reads the raw handle directly (well under a microsecond; building the ``Stream`` object costs
    about 8 us per call, which adds up over a model's eager decode step)."""
    def public(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream

    try:
        from triton.runtime import driver

        query = driver.active.get_current_stream
        index = torch.cuda.current_device()
        if query(index) != public(index):  # (never seen; keeps the public answer authoritative)
            return public
        return query
    except Exception:  # noqa: BLE001 - no Triton, or no active Triton driver
        return public


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
    dev = packed.device.index if packed.device.index is not None else torch.cuda.current_device()
    k = kernel(key, dev)
    if ver == 9:
        smem, grid, ranges = v9_plan(packed, spb, warps, key.noct, sb)
        _allow_smem(k, smem, dev)
        args = common[:5] + [tensor_maps(packed, spb, br), items, ranges, M, N, 0, 0, split, cpt,
                             packed.tile_rows] + extra
        return MmaLaunch(k, dev, (grid, 1, 1), (32 * (warps + 1), 1, 1), smem, args, 10, M, 16, split > 1)
    args = common + [packed.sp_cols, packed.sp_ptr, packed.dn_cols, packed.dn_ptr, packed.row_info,
                     M, N, 0, 0, split, cpt, packed.tile_rows, packed.tile_cols.bit_length() - 1]
    return MmaLaunch(k, dev, (n_chunks, split, 1), (32 * warps, 1, 1), 0, args, 15, M, 4, split > 1)


class MmaLaunch:
    """A prepared launch of one mma kernel configuration for one layer and token count (:func:`prepare`): the
    kernel parameters live in an array built once (``void*`` per parameter, pointing at its value), and a call
    only writes the pointers of x, out and bias and the row strides into it before ``cuLaunchKernel`` -- a few
    microseconds of host time instead of the checks, table look-ups and argument conversion of a full
    :func:`launch`."""

    def __init__(self, k, device_index: int, grid: tuple, block: tuple, smem: int, args: list, i_sx: int, M: int,
                 align: int, split_k: bool):
        import ctypes
        self._args = args  # (keeps the bound tensors alive)
        self._vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else
                      (ctypes.c_void_p(0) if i < 5 else ctypes.c_int(a)) for i, a in enumerate(args)]
        self._params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(v) for v in self._vals])
        self._address = ctypes.addressof(self._params)
        self._device = device_index
        self._plain = _cd.Launcher(k, device_index, grid, block, smem)
        self._dependent = None
        self._k, self._grid, self._block, self._smem = k, grid, block, smem
        self._i_sx, self.M, self._align, self._split_k = i_sx, M, align, split_k
        self._stream = current_stream_handle()

    def __call__(self, x2: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """``out [M, N] = x2 [M, K] @ W^T (+ bias)`` on the current stream of the layer's device (bias as
        prepared: given or not)."""
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
        stream = self._stream(self._device)
        if pdl_enabled(self._device):  # (reads the environment first: the capability only when asked for)
            if self._dependent is None:
                self._dependent = _cd.Launcher(self._k, self._device, self._grid, self._block, self._smem,
                                                 dependent=True)
            self._dependent(stream, self._address)
        else:
            self._plain(stream, self._address)
