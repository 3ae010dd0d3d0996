"""v7 / v8 decode kernels: the hybrid linear on sparse tensor cores (``mma.sp``), CUDA C++ compiled at run time.

Triton has no sparse MMA, so these kernels are CUDA C++ (``csrc/hybrid_mma.cu`` v7, ``csrc/hybrid_mma8.cu``
v8, helpers in ``csrc/mma_common.cuh``) compiled by NVRTC through torch (``torch.cuda._compile_kernel``:
NVRTC ships with torch's CUDA wheels; no ``nvcc`` needed) for the current GPU and cached per configuration.
2:4 tiles go to ``mma.sp.m16n8k32`` as stored (the format's 2-bit positions *are* the instruction's
metadata), dense tiles to ``mma.m16n8k16``; see the sources' headers. v8 stages a block's x once (at most
``spb`` 64-column steps per block) and reads the steps' input columns from a per-layer step table
(:func:`step_table`, cached on the layer).

Requirements (else :func:`mma_supported` is false and the Triton kernels serve the layer): a CUDA device
of compute capability 8.0+, 16-bit weights, ``tile_cols`` a power of two >= 64, ``tile_rows % 16 == 0``,
``in_features % 64 == 0``, ``out_features % 16 == 0``, 16-byte aligned value arrays. It does not run on
the Triton CPU interpreter: it is checked on the GPU by ``benchmarks/kernels.py --check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

from .format import PackedHybrid

MAX_TOKENS = 64
MAX_STEPS = 512  # v7: 64-column steps per block (csrc/hybrid_mma.cu)
V8_SMEM_KB = 32  # v8: shared memory for x, spb * octets KB


@dataclass(frozen=True)
class MmaKey:
    bf16: bool
    noct: int
    warps: int
    sb: int
    bias: bool
    ver: int = 7
    spb: int = 0  # v8: steps per block
    probe: bool = False  # v8: per-block timeline output (benchmarks/mma_timeline.py)
    pf: bool = False  # v8: the block's weights prefetched into L2 first

    @property
    def name(self) -> str:
        v = (f"_p{self.spb}" + ("_pf" if self.pf else "") + ("_probe" if self.probe else "")) if self.ver == 8 else ""
        return (f"hybrid_mma{'8' if self.ver == 8 else ''}_{'bf16' if self.bf16 else 'f16'}_o{self.noct}"
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
    if key.ver == 8:
        macros += [("SPB", key.spb), ("PF", int(key.pf)), ("PROBE", int(key.probe))]
    head = "".join(f"#define {k} {v}\n" for k, v in macros)
    return head + source("mma_common.cuh") + source("hybrid_mma8.cu" if key.ver == 8 else "hybrid_mma.cu")


def available() -> bool:
    """True when a CUDA device of compute capability 8.0+ and torch's runtime compiler are present."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def kernel(key: MmaKey):
    """The compiled kernel of one configuration (NVRTC, once per process)."""
    k = _KERNELS.get(key)
    if k is None:
        k = torch.cuda._compile_kernel(configured_source(key), key.name, nvcc_options=["-std=c++17"])
        _KERNELS[key] = k
    return k


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
    """v8's per-layer step table (built once, cached on ``packed``): int32 ``[R, S]``, entry ``[r, s]`` = the
    first input column of tile-row ``r``'s ``s``-th 64-column step (its 2:4 steps first, then its dense
    steps, in the order of the stored values); zeros past a row's last step; ``S`` = the steps of a full
    tile-row, ``ceil(in_features / 64)``, rounded up to a multiple of 32 (the largest steps per block)."""
    tab = packed.__dict__.get("_mma_steps")
    if tab is not None:
        return tab
    TC = packed.tile_cols
    info = packed.row_info.cpu()
    lens = [(int(info[r, 0]) // 64, int(info[r, 5]) // 64) for r in range(packed.grid.n_rows)]
    S = max([1] + [a + b for a, b in lens])
    full = -(-packed.in_features // 64)  # steps of a tile-row without zero tiles
    tab = torch.zeros(packed.grid.n_rows, -(-full // 32) * 32, dtype=torch.int32)
    sp_ptr, sp_cols = packed.sp_ptr.cpu(), packed.sp_cols.cpu()
    dn_ptr, dn_cols = packed.dn_ptr.cpu(), packed.dn_cols.cpu()
    for r, (n_sp, n_dn) in enumerate(lens):
        parts = []
        for n, ptr, cols in ((n_sp, sp_ptr, sp_cols), (n_dn, dn_ptr, dn_cols)):
            pos = torch.arange(n, dtype=torch.int64) * 64
            parts.append(cols[int(ptr[r]) + pos // TC].to(torch.int64) * TC + pos % TC)
        row = torch.cat(parts)
        tab[r, :row.numel()] = row.to(torch.int32)
    tab = tab.to(packed.device)
    packed.__dict__["_mma_steps"] = tab
    packed.__dict__["_mma_max_steps"] = S
    return tab


def max_steps(packed: PackedHybrid) -> int:
    """The most 64-column steps (2:4 and dense) of any tile-row of the layer."""
    step_table(packed)
    return packed.__dict__["_mma_max_steps"]


def v8_fits(spb: int, sb: int, noct: int, warps: int) -> bool:
    """Whether v8 compiles well for these: x of ``spb`` steps in shared memory (``spb * noct`` KB) and at most
    8 16-byte x pieces per thread (registers)."""
    return sb <= spb and spb * noct <= V8_SMEM_KB and spb * noct <= 4 * warps


def launch(x2: torch.Tensor, packed: PackedHybrid, bias, out: torch.Tensor, warps: int, split: int, sb: int,
           ws: torch.Tensor | None, cnt: torch.Tensor | None, ver: int = 7, spb: int = 0,
           probe: torch.Tensor | None = None, pf: bool = False) -> None:
    """Run the kernel (``ver`` 7 or 8) on ``x2 [M, K]`` (``M <= 64``) into ``out [M, N]``; ``warps * 16`` must
    divide ``tile_rows``; ``split > 1`` needs ``ws`` (fp32, ``>= M * N``, zero) and ``cnt`` (int32, ``>=``
    number of row chunks, zero), which the kernel leaves zero. v8: ``split`` must leave at most ``spb`` steps
    per block; ``probe`` (v8, int64, 8 per block) receives each block's timeline (the probe build of the kernel)."""
    M, _ = x2.shape
    N = packed.out_features
    if M > MAX_TOKENS:
        raise ValueError(f"mma kernel: {M} tokens > {MAX_TOKENS}")
    if ver not in (7, 8):
        raise ValueError(f"mma kernel: no version {ver}")
    a = 16 if ver == 8 else 4  # v8 loads x by 16 bytes, v7 copies 4 bytes
    if x2.stride(1) != 1 or x2.stride(0) % (a // 2) or x2.data_ptr() % a:
        x2 = x2.contiguous()
    br = 16 * warps
    if packed.tile_rows % br:
        raise ValueError(f"mma kernel: {br} rows per block do not divide tile_rows={packed.tile_rows}")
    key = MmaKey(packed.dtype == torch.bfloat16, octets(M), warps, sb, bias is not None, ver, spb if ver == 8 else 0,
                 probe is not None, pf and ver == 8)
    if probe is not None and ver != 8:
        raise ValueError("mma kernel: the timeline probe is v8 only")
    if ver == 7 and -(-packed.in_features // 64) > MAX_STEPS * split:
        raise ValueError(f"mma kernel: split={split} leaves more than {MAX_STEPS} steps per block")
    if ver == 8:
        tab = step_table(packed)
        if not v8_fits(spb, sb, key.noct, warps) or split * spb < max_steps(packed) or split * spb > tab.shape[1]:
            raise ValueError(f"mma kernel v8: split={split}, spb={spb}, sb={sb}, warps={warps} do not fit "
                             f"{max_steps(packed)} steps and {key.noct} token octets")
    cpt = packed.tile_rows // br
    n_chunks = packed.grid.n_rows * cpt
    if split > 1 and (ws is None or cnt is None or ws.numel() < M * N or cnt.numel() < n_chunks):
        raise ValueError("mma kernel: split > 1 needs ws [M*N] and cnt [row chunks]")
    u16 = torch.int16
    common = [x2.view(u16), out.view(u16), (bias if bias is not None else out).view(u16),
              ws if split > 1 else out, cnt if split > 1 else out,
              packed.sp_vals.view(u16), packed.sp_meta, packed.dn_vals.view(u16)]
    if ver == 8:
        args = common + [tab, packed.row_info, M, N, x2.stride(0), out.stride(0), split, cpt, packed.tile_rows,
                         tab.shape[1]] + ([probe] if probe is not None else [])
    else:
        args = common + [packed.sp_cols, packed.sp_ptr, packed.dn_cols, packed.dn_ptr, packed.row_info,
                         M, N, x2.stride(0), out.stride(0), split, cpt, packed.tile_rows,
                         packed.tile_cols.bit_length() - 1]
    kernel(key)(grid=(n_chunks, split, 1), block=(32 * warps, 1, 1), args=args)
