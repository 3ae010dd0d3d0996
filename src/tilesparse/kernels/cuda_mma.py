"""v7 decode kernel: the hybrid linear on sparse tensor cores (``mma.sp``), CUDA C++ compiled at run time.

Triton has no sparse MMA, so this kernel is CUDA C++ (``csrc/hybrid_mma.cu``) compiled by NVRTC through
torch (``torch.cuda._compile_kernel``: NVRTC ships with torch's CUDA wheels; no ``nvcc`` needed) for the
current GPU and cached per configuration. 2:4 tiles go to ``mma.sp.m16n8k32`` as stored (the format's 2-bit
positions *are* the instruction's metadata), dense tiles to ``mma.m16n8k16``; see the source's header.

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
MAX_STEPS = 512  # 64-column steps per block (csrc/hybrid_mma.cu)


@dataclass(frozen=True)
class MmaKey:
    bf16: bool
    noct: int
    warps: int
    sb: int
    bias: bool

    @property
    def name(self) -> str:
        return (f"hybrid_mma_{'bf16' if self.bf16 else 'f16'}_o{self.noct}_w{self.warps}_s{self.sb}"
                f"{'_b' if self.bias else ''}")


_SOURCE: str | None = None
_KERNELS: dict = {}


def source() -> str:
    """The CUDA C++ source of the kernel (without the configuration macros)."""
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = resources.files("tilesparse.kernels").joinpath("csrc/hybrid_mma.cu").read_text()
    return _SOURCE


def configured_source(key: MmaKey) -> str:
    """The source with the macros of one configuration prepended."""
    head = "".join(f"#define {k} {v}\n" for k, v in (
        ("DT_BF16", int(key.bf16)), ("NOCT", key.noct), ("WARPS", key.warps), ("SB", key.sb),
        ("HAS_BIAS", int(key.bias)), ("KNAME", key.name)))
    return head + source()


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


def launch(x2: torch.Tensor, packed: PackedHybrid, bias, out: torch.Tensor, warps: int, split: int, sb: int,
           ws: torch.Tensor | None, cnt: torch.Tensor | None) -> None:
    """Run the kernel on ``x2 [M, K]`` (``M <= 64``) into ``out [M, N]``; ``warps * 16`` must divide
    ``tile_rows``; ``split > 1`` needs ``ws`` (fp32, ``>= M * N``, zero) and ``cnt`` (int32, ``>=`` number of
    row chunks, zero), which the kernel leaves zero."""
    M, _ = x2.shape
    N = packed.out_features
    if M > MAX_TOKENS:
        raise ValueError(f"mma kernel: {M} tokens > {MAX_TOKENS}")
    if x2.stride(1) != 1 or x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.contiguous()
    br = 16 * warps
    if packed.tile_rows % br:
        raise ValueError(f"mma kernel: {br} rows per block do not divide tile_rows={packed.tile_rows}")
    key = MmaKey(packed.dtype == torch.bfloat16, octets(M), warps, sb, bias is not None)
    if -(-packed.in_features // 64) > MAX_STEPS * split:
        raise ValueError(f"mma kernel: split={split} leaves more than {MAX_STEPS} steps per block")
    cpt = packed.tile_rows // br
    n_chunks = packed.grid.n_rows * cpt
    if split > 1 and (ws is None or cnt is None or ws.numel() < M * N or cnt.numel() < n_chunks):
        raise ValueError("mma kernel: split > 1 needs ws [M*N] and cnt [row chunks]")
    u16 = torch.int16
    kernel(key)(
        grid=(n_chunks, split, 1), block=(32 * warps, 1, 1),
        args=[x2.view(u16), out.view(u16), (bias if bias is not None else out).view(u16),
              ws if split > 1 else out, cnt if split > 1 else out,
              packed.sp_vals.view(u16), packed.sp_meta, packed.dn_vals.view(u16),
              packed.sp_cols, packed.sp_ptr, packed.dn_cols, packed.dn_ptr, packed.row_info,
              M, N, x2.stride(0), out.stride(0), split, cpt, packed.tile_rows,
              packed.tile_cols.bit_length() - 1])
