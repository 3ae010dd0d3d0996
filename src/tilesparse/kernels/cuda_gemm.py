"""The hybrid GEMM on sparse tensor cores (v10): 16 tokens and more, CUDA C++ compiled at run time.

``csrc/hybrid_gemm.cu`` runs a packed layer as a GEMM: a block owns ``bm`` weight rows of one tile-row and ``bt``
tokens, and walks the tile-row's 64-column steps (2:4 steps by ``mma.sp.m16n8k32`` on the stored values and
positions, dense steps by ``mma.m16n8k16``) through ``nst`` shared-memory stages filled by 16-byte ``cp.async``
copies, operands read by ``ldmatrix``; ``split`` blocks share a tile-row's steps (split-K) where the layer has
too few row blocks for the GPU. Unlike the decode kernels (:mod:`.cuda_mma`: weights in registers, x per
block in the MMA's fragment order) the weights and x are staged once per block and reused by every warp, so
the cost per token falls as the token count grows. Compilation, loading and launching are :mod:`.cuda_mma`'s
(:class:`GemmKey` is compiled by :func:`.cuda_mma.kernel`; a prepared launch is a :class:`.cuda_mma.MmaLaunch`).

Requirements: those of the decode kernels (:func:`.cuda_mma.mma_supported`), and x rows 16-byte aligned
(a row stride that is a multiple of 8; else x is copied contiguous).

Checked against float64 on the H100 (``benchmarks/kernel_speed.py --check --gemm-only``: 16-1000 tokens, four
layer classes, both 16-bit types; ``benchmarks/spikes/gemm_route/v10.py``) and on the CPU under the host
emulation (``tests/kernels/test_kernels_gemm.py``). The dispatcher offers it at 16-64 tokens
(:func:`.ops.gemm_candidates`), where it was faster than the decode kernels at 64 tokens; at 256 and 2048 tokens
it is slower than unpacking for cuBLAS (``benchmarks/results/gemm_v10_h100.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cuda_mma as _cm
from .format import PackedHybrid

MAX_STEPS = 512  # 64-column steps per block (csrc/hybrid_gemm.cu)
I_SX = 15  # index of the x row stride among the kernel's parameters
SMEM_STATIC = 4 * MAX_STEPS + 4


@dataclass(frozen=True)
class GemmKey:
    """One compiled configuration (the macros of ``hybrid_gemm.cu``): ``bm`` weight rows and ``bt`` tokens per
    block, ``wm`` x ``wn`` warps (rows x tokens), ``nst`` shared-memory stages."""

    bf16: bool
    bm: int
    bt: int
    wm: int
    wn: int
    nst: int
    bias: bool

    @property
    def name(self) -> str:
        return (f"hybrid_gemm_{'bf16' if self.bf16 else 'f16'}_m{self.bm}_t{self.bt}_w{self.wm}x{self.wn}"
                f"_n{self.nst}{'_b' if self.bias else ''}")

    @property
    def warps(self) -> int:
        return self.wm * self.wn

    def configured_source(self) -> str:
        """The source with this configuration's macros and the shared helpers (``mma_common.cuh``) prepended."""
        macros = [("DT_BF16", int(self.bf16)), ("BM", self.bm), ("BT", self.bt), ("WM", self.wm), ("WN", self.wn),
                  ("NST", self.nst), ("NOCT", self.bt // self.wn // 8), ("HAS_BIAS", int(self.bias)),
                  ("KNAME", self.name)]
        head = "".join(f"#define {k} {v}\n" for k, v in macros)
        return head + _cm.source("mma_common.cuh") + _cm.source("hybrid_gemm.cu")


def stage_bytes(bm: int, bt: int) -> int:
    """Shared memory of one stage: ``bm`` rows of 128 bytes of weights and 8 of metadata, ``bt`` rows of 128
    bytes of x."""
    return bm * 136 + bt * 128


def smem_bytes(bm: int, bt: int, nst: int) -> int:
    """Dynamic shared memory of a block."""
    return nst * stage_bytes(bm, bt)


def shape_reason(bm: int, bt: int, wm: int, wn: int, nst: int, tile_rows: int, smem_limit: int) -> str | None:
    """``None`` when the block shape is valid for tiles of ``tile_rows`` rows and ``smem_limit`` bytes of
    shared memory per block, else why not (one line)."""
    if wm < 1 or wn < 1 or wm * wn > 16:
        return f"{wm}x{wn} warps"
    if bm % (16 * wm) or tile_rows % bm:
        return f"bm={bm} is not a multiple of {16 * wm} dividing tile_rows={tile_rows}"
    if bt % (8 * wn) or bt // wn // 8 not in (1, 2, 4, 8):
        return f"bt={bt} does not give {wn} warps 1, 2, 4 or 8 token octets each"
    if (bm // wm // 16) * (bt // wn // 8) > 16:
        return f"a warp tile of {bm // wm} rows x {bt // wn} tokens holds more than 64 accumulators per thread"
    if not 2 <= nst <= 6:
        return f"nst={nst} stages (2-6)"
    if smem_bytes(bm, bt, nst) + SMEM_STATIC > smem_limit:
        return f"{nst} stages of {stage_bytes(bm, bt)} bytes exceed {smem_limit} bytes of shared memory"
    return None


def launch_plan(packed: PackedHybrid, M: int, dtype: torch.dtype, has_bias: bool, bm: int, bt: int, wm: int, wn: int,
                nst: int, split: int, ws: torch.Tensor | None, cnt: torch.Tensor | None,
                smem_limit: int = 232448) -> tuple[GemmKey, tuple, tuple, int, list]:
    """Check one configuration against the layer and ``M`` tokens (``ValueError``, one line, where it does not
    fit) and return ``(key, grid, block, smem, args)``: the kernel's parameters in order, x / out / bias (and ws
    / cnt without split-K) as 0 and the row strides as 0, bound per call (:class:`.cuda_mma.MmaLaunch`).
    ``split > 1`` needs ``ws`` (fp32, ``>= M * N``, zero) and ``cnt`` (int32, ``>=`` row chunks x token blocks,
    zero), left zero by the kernel."""
    if dtype not in (torch.bfloat16, torch.float16) or packed.dtype != dtype:
        raise ValueError(f"hybrid GEMM: x and the weights must be one 16-bit type, got {dtype} and {packed.dtype}")
    if M < 1:
        raise ValueError(f"hybrid GEMM: {M} tokens")
    why = shape_reason(bm, bt, wm, wn, nst, packed.tile_rows, smem_limit)
    if why is not None:
        raise ValueError(f"hybrid GEMM: {why}")
    if split < 1 or -(-packed.in_features // 64) > MAX_STEPS * split:
        raise ValueError(f"hybrid GEMM: split={split} leaves more than {MAX_STEPS} steps per block")
    N = packed.out_features
    cpt = packed.tile_rows // bm
    n_chunks = packed.grid.n_rows * cpt
    ntb = -(-M // bt)
    if split > 1 and (ws is None or cnt is None or ws.numel() < M * N or cnt.numel() < n_chunks * ntb):
        raise ValueError("hybrid GEMM: split > 1 needs ws [M*N] and cnt [row chunks x token blocks]")
    key = GemmKey(dtype == torch.bfloat16, bm, bt, wm, wn, nst, has_bias)
    args = [0, 0, 0, ws if split > 1 else 0, cnt if split > 1 else 0, packed.sp_vals, packed.sp_meta,
            packed.dn_vals, packed.sp_cols, packed.sp_ptr, packed.dn_cols, packed.dn_ptr, packed.row_info,
            M, N, 0, 0, split, cpt, packed.tile_rows, packed.tile_cols.bit_length() - 1, n_chunks]
    return key, (n_chunks * ntb, split, 1), (32 * wm * wn, 1, 1), smem_bytes(bm, bt, nst), args


def prepare(packed: PackedHybrid, M: int, has_bias: bool, bm: int, bt: int, wm: int, wn: int, nst: int, split: int,
            ws: torch.Tensor | None, cnt: torch.Tensor | None) -> _cm.MmaLaunch:
    """Check one configuration (:func:`launch_plan`), compile it for the layer's device and return its launch
    with everything but x, out and bias bound: call it with ``(x2, out, bias)``."""
    dev = packed.device.index if packed.device.index is not None else torch.cuda.current_device()
    limit = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    key, grid, block, smem, args = launch_plan(packed, M, packed.dtype, has_bias, bm, bt, wm, wn, nst, split, ws,
                                               cnt, limit)
    k = _cm.kernel(key, dev)
    _cm._allow_smem(k, smem, dev)
    return _cm.MmaLaunch(k, dev, grid, block, smem, args, I_SX, M, 16, split > 1)


__all__ = ["GemmKey", "launch_plan", "prepare", "shape_reason", "smem_bytes", "stage_bytes"]
