"""The v7 sparse-tensor-core decode kernel on 4-bit layers (:mod:`.format_q4`): CUDA C++ compiled at run time.

``csrc/hybrid_mma_q4.cu`` is v7 (``csrc/hybrid_mma.cu``, :mod:`.cuda_mma`) reading 4-bit codes: 2:4 steps by
``mma.sp.m16n8k32`` on the stored codes and metadata, dense steps by ``mma.m16n8k16``, the codes dequantized in
registers to x's 16-bit type (``scale * (code - zero)``); the source's header gives the fragment layout and the
K permutation. Compilation, loading and launching are :mod:`.cuda_mma`'s (:class:`MmaQ4Key` is compiled by
:func:`.cuda_mma.kernel`, a prepared launch is a :class:`.cuda_mma.MmaLaunch`).

A configuration with ``qst`` > 0 keeps ``qst - 1`` batches of codes in flight through shared memory (cp.async)
instead of one in registers (checked on the H100, slower there than the default; not the default). An L2
prefetch of the codes of later batches was tried and removed: slower than none in every cell on an NVIDIA H200
(``benchmarks/results/q4_decode_h200.md``).

Checked against float64 on the H100 at 1 and 16 tokens (``benchmarks/q4_decode.py``) and under the CPU tests'
emulation at more; :func:`.library.q4_linear` runs it for up to :data:`DISPATCH_TOKENS` tokens where it applies
(``TILESPARSE_Q4_MMA=0``: the Triton kernel, :mod:`.triton_q4`, instead).

Requirements (:func:`unsupported_reason`): ``tile_cols`` a power of two >= 64, ``tile_rows % 16 == 0``,
``in_features % 64 == 0``, ``out_features % 16 == 0``, a group size of 16, 32 or a multiple of 64 (the 16
columns a thread holds of a step lie in one quantization group; other group sizes stay with the Triton kernel,
and the library sends it only multiples of :data:`DISPATCH_GROUPS`), aligned code and metadata arrays, and what
the v7 kernel needs of the machine (:func:`.cuda_mma.unavailable_reason`). 1-64 bfloat16 / float16 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cuda_mma as _cm
from .format_q4 import PackedHybridQ4, check_q4_operands

MAX_TOKENS = _cm.MAX_TOKENS
DISPATCH_TOKENS = 16  # library.q4_linear's range for this kernel: the token counts checked on a GPU
DISPATCH_GROUPS = 32  # library.q4_linear sends it group sizes that are multiples of this: those checked on a GPU
# (groups of 16 pass the CPU emulation and run when the kernel is called directly)
MAX_STEPS = _cm.MAX_STEPS  # 64-column steps per block (csrc/hybrid_mma_q4.cu)
SMEM_LIMIT = 48 * 1024  # static shared memory of a block
DTYPES = (torch.bfloat16, torch.float16)
I_SX = 17  # index of the x row stride among the kernel's parameters (MmaLaunch writes it and out's per call)

# -(MAGIC + zero) in the high half of a parameter word: MAGIC = 128 (bf16) / 1024 (fp16), zero in the low bits
_NEG_MAGIC = {torch.bfloat16: 0xC300, torch.float16: 0xE400}


@dataclass(frozen=True)
class MmaQ4Key:
    """One compiled configuration of the 4-bit kernel (the macros of ``hybrid_mma_q4.cu``; ``qst`` = 0: the next
    batch's codes in registers, else that many shared-memory stages of codes and x)."""

    bf16: bool
    noct: int
    warps: int
    sb: int
    bias: bool
    qst: int = 0

    @property
    def name(self) -> str:
        return (f"hybrid_mma_q4_{'bf16' if self.bf16 else 'f16'}_o{self.noct}_w{self.warps}_s{self.sb}"
                f"{f'_q{self.qst}' if self.qst else ''}{'_b' if self.bias else ''}")

    def configured_source(self) -> str:
        """The source with this configuration's macros and the shared helpers (``mma_common.cuh``) prepended."""
        macros = [("DT_BF16", int(self.bf16)), ("NOCT", self.noct), ("WARPS", self.warps), ("SB", self.sb),
                  ("QST", self.qst), ("HAS_BIAS", int(self.bias)), ("KNAME", self.name)]
        head = "".join(f"#define {k} {v}\n" for k, v in macros)
        return head + _cm.source("mma_common.cuh") + _cm.source("hybrid_mma_q4.cu")


def static_smem(noct: int, sb: int, qst: int = 0, warps: int = 1) -> int:
    """Static shared memory of a block: two x buffers of ``sb`` steps of ``noct`` token octets (``qst`` of them,
    and as many stages of the ``warps`` warps' code slots, 1 KB per warp and step, when ``qst`` > 0), and the
    column and group of each of its steps."""
    codes = qst * warps * sb * 1024
    return (qst or 2) * sb * noct * 1024 + codes + 2 * 4 * MAX_STEPS + 4


def _aligned(t: torch.Tensor, a: int) -> bool:
    return t.numel() == 0 or t.data_ptr() % a == 0


def layout_reason(packed: PackedHybridQ4) -> str | None:
    """``None`` when the layer's shape, tiles, group size and arrays fit the kernel, else why not (one line);
    the device is not looked at (:func:`unsupported_reason`)."""
    tc, g = packed.tile_cols, packed.group_size
    if tc < 64 or tc & (tc - 1):
        return f"tile_cols={tc} is not a power of two >= 64"
    if packed.tile_rows % 16:
        return f"tile_rows={packed.tile_rows} is not a multiple of 16"
    if packed.in_features % 64 or packed.out_features % 16:
        return (f"in_features={packed.in_features} must be a multiple of 64 and out_features={packed.out_features} "
                "of 16")
    if g % 64 and g not in (16, 32):
        return (f"group_size={g} is not 16, 32 or a multiple of 64 (a thread's 16 columns of a step must lie in one "
                "group)")
    if not (_aligned(packed.sp_codes, 16) and _aligned(packed.dn_codes, 16) and _aligned(packed.sp_meta, 8)):
        return "the code arrays are not 16-byte aligned (or the metadata 8-byte aligned)"
    return None


def _cache(packed: PackedHybridQ4) -> dict:
    """This module's tables, answers and prepared launches for one layer (dropped by ``rebuild_layout()``; a
    module whose buffers change gets a new ``PackedHybridQ4``)."""
    return packed.__dict__.setdefault("_mma_q4", {})


def unsupported_reason(packed: PackedHybridQ4) -> str | None:
    """``None`` when the kernel can run this layer on its device, else why not (one line; cached on the
    layer)."""
    cache = _cache(packed)
    if "reason" not in cache:
        why = layout_reason(packed)
        if why is None and packed.device.type != "cuda":
            why = f"the layer is on {packed.device}, not on a CUDA device"
        cache["reason"] = why if why is not None else _cm.unavailable_reason(packed.device)
    return cache["reason"]


def mma_q4_supported(packed: PackedHybridQ4) -> bool:
    """True when the kernel can run this layer on its device (see :func:`unsupported_reason`)."""
    return unsupported_reason(packed) is None


def param_table(packed: PackedHybridQ4, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's scales and zero points (built once per dtype, cached on ``packed``): int32 ``[out / 16,
    n_groups, 8, 2]``, entry ``[s, G, g, h]`` = the word of row ``16 s + g + 8 h`` and group ``G``: its scale in
    ``dtype`` in the low 16 bits and ``-(MAGIC + zero)`` in ``dtype`` in the high 16 (MAGIC = 128 for bfloat16,
    1024 for float16; both exact). A warp's 16 rows of one group are 64 contiguous bytes; a lane reads its two
    rows' words in one 8-byte load. (float16 rounds the bfloat16 scales. Scales or zero points changed in place
    need ``rebuild_layout()``.)"""
    cache = _cache(packed)
    key = ("params", dtype, packed.scales.data_ptr(), packed.zeros.data_ptr())
    hit = cache.get(key)
    if hit is not None:
        return hit
    N, NG = packed.out_features, packed.n_groups
    if N % 16 or dtype not in _NEG_MAGIC:
        raise ValueError(f"q4 mma kernel: parameter table needs out_features % 16 == 0 and bfloat16/float16, got "
                         f"{N} and {dtype}")
    scale = packed.scales.to(dtype).view(torch.int16)
    nz = (packed.zeros.to(torch.int32) | _NEG_MAGIC[dtype]) - 65536  # as the int16 of the same bits
    words = torch.stack([scale, nz.to(torch.int16)], dim=-1).view(torch.int32).view(N // 16, 2, 8, NG)
    table = words.permute(0, 3, 2, 1).contiguous()
    cache[key] = table
    return table


def launch_plan(packed: PackedHybridQ4, M: int, dtype: torch.dtype, has_bias: bool, warps: int, split: int,
                sb: int, ws: torch.Tensor | None, cnt: torch.Tensor | None,
                qst: int = 0) -> tuple[MmaQ4Key, tuple, tuple, list]:
    """Check one configuration against the layer (``ValueError``, one line, where it does not fit) and return
    ``(key, grid, block, args)``: the kernel's parameters in order, x / out / bias (and ws / cnt without
    split-K) as 0 and the row strides as 0, to be bound per call (:class:`.cuda_mma.MmaLaunch`). ``split > 1``
    needs ``ws`` (fp32, ``>= M * N``, zero) and ``cnt`` (int32, ``>=`` row chunks, zero), left zero by the
    kernel."""
    why = layout_reason(packed)
    if why is not None:
        raise ValueError(f"q4 mma kernel: {why}")
    if dtype not in DTYPES:
        raise ValueError(f"q4 mma kernel: x must be bfloat16 or float16, got {dtype}")
    if not 1 <= M <= MAX_TOKENS:
        raise ValueError(f"q4 mma kernel: takes 1..{MAX_TOKENS} tokens, got {M}")
    if warps not in (1, 2, 4, 8, 16) or packed.tile_rows % (16 * warps):
        raise ValueError(f"q4 mma kernel: warps={warps} is not 1, 2, 4, 8 or 16 with 16 * warps dividing "
                         f"tile_rows={packed.tile_rows}")
    noct = _cm.octets(M)
    if qst != 0 and not 2 <= qst <= 8:
        raise ValueError(f"q4 mma kernel: qst={qst} code stages (0: registers, else 2-8)")
    if sb < 1 or static_smem(noct, sb, qst, warps) > SMEM_LIMIT:
        raise ValueError(f"q4 mma kernel: sb={sb} steps per batch{f' in {qst} stages' if qst else ''} do not fit "
                         f"{SMEM_LIMIT} bytes of shared memory for {noct} token octets and {warps} warps")
    if split < 1 or -(-packed.in_features // 64) > MAX_STEPS * split:
        raise ValueError(f"q4 mma kernel: split={split} leaves more than {MAX_STEPS} steps per block")
    n_chunks = packed.grid.n_rows * (packed.tile_rows // (16 * warps))
    if split > 1 and (ws is None or cnt is None or ws.numel() < M * packed.out_features or cnt.numel() < n_chunks):
        raise ValueError("q4 mma kernel: split > 1 needs ws [M*N] and cnt [row chunks]")
    key = MmaQ4Key(dtype == torch.bfloat16, noct, warps, sb, has_bias, qst)
    args = [0, 0, 0, ws if split > 1 else 0, cnt if split > 1 else 0, packed.sp_codes, packed.sp_meta,
            packed.dn_codes, param_table(packed, dtype), packed.sp_cols, packed.sp_ptr, packed.dn_cols,
            packed.dn_ptr, packed.row_info, packed.q4_info, M, packed.out_features, 0, 0, split,
            packed.tile_rows // (16 * warps), packed.tile_rows, packed.tile_cols.bit_length() - 1, packed.n_groups,
            packed.group_size]
    return key, (n_chunks, split, 1), (32 * warps, 1, 1), args


def prepare(packed: PackedHybridQ4, M: int, dtype: torch.dtype, has_bias: bool, warps: int, split: int, sb: int,
            ws: torch.Tensor | None, cnt: torch.Tensor | None, qst: int = 0) -> _cm.MmaLaunch:
    """Check one configuration (:func:`launch_plan`), compile it for the layer's device and return its launch
    with everything but x, out and bias bound: call it with ``(x2, out, bias)``."""
    key, grid, block, args = launch_plan(packed, M, dtype, has_bias, warps, split, sb, ws, cnt, qst)
    dev = packed.device.index if packed.device.index is not None else torch.cuda.current_device()
    return _cm.MmaLaunch(_cm.kernel(key, dev), dev, grid, block, 0, args, I_SX, M, 4, split > 1)


def default_config(M: int, packed: PackedHybridQ4, sms: int) -> dict:
    """A configuration for ``M`` tokens on a device with ``sms`` multiprocessors (what :func:`.library.q4_linear`
    runs): the most warps up to 4 whose rows divide the tile height, 2 steps per batch (1 for 33-64 tokens), the
    split-K that fills one wave of the blocks the launch bounds keep resident (16 warps per multiprocessor) while a
    block keeps at least 8 of the widest tile-row's steps (a grid past one wave leaves a tail of blocks running
    alone)."""
    warps = next(w for w in (4, 2, 1) if packed.tile_rows % (16 * w) == 0)
    n_chunks = packed.grid.n_rows * (packed.tile_rows // (16 * warps))
    steps = packed.in_features // 64
    resident = sms * (16 // warps)
    split = max(1, min(resident // n_chunks, steps // 8))
    split = max(split, -(-steps // MAX_STEPS))
    return {"warps": warps, "split": split, "sb": 2 if _cm.octets(M) <= 4 else 1}


def layer_config(M: int, packed: PackedHybridQ4) -> dict:
    """:func:`default_config` on the layer's CUDA device (cached on the layer per token count)."""
    cache = _cache(packed)
    key = ("config", M)
    if key not in cache:
        cache[key] = default_config(M, packed, _cm._sm_count(packed.device))
    return cache[key]


def _prepared(packed: PackedHybridQ4, M: int, dtype: torch.dtype, has_bias: bool, warps: int, split: int,
              sb: int, qst: int = 0) -> _cm.MmaLaunch:
    """The prepared launch of one configuration, cached on ``packed`` (dropped by ``rebuild_layout()``) and
    rebuilt when the split-K workspaces were replaced."""
    from .ops import _buffer

    ws = cnt = None
    if split > 1:
        ws = _buffer("mma_ws", packed.device, M * packed.out_features, torch.float32)
        cnt = _buffer("mma_cnt", packed.device, packed.grid.n_rows * (packed.tile_rows // (16 * warps)), torch.int32)
    cache = _cache(packed)
    key = ("launch", M, dtype, has_bias, warps, split, sb, qst)
    hit = cache.get(key)
    if hit is None or hit[1] is not ws or hit[2] is not cnt:
        hit = cache[key] = (prepare(packed, M, dtype, has_bias, warps, split, sb, ws, cnt, qst), ws, cnt)
    return hit[0]


def q4_mma_linear(x2: torch.Tensor, packed: PackedHybridQ4, bias: torch.Tensor | None = None, warps: int = 4,
                  split: int = 1, sb: int = 2, qst: int = 0) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` for ``x2 [M, in_features]`` (1-64 bfloat16 / float16 tokens) with the 4-bit mma
    kernel: ``warps`` warps of 16 rows per block, ``split`` blocks per row chunk along K (split-K), ``sb``
    64-column steps per batch, ``qst`` shared-memory stages of codes (0: the next batch in registers;
    :class:`MmaQ4Key`); returns ``[M, out_features]`` in ``x2``'s dtype. A one-line ``ValueError`` /
    ``TypeError`` where the layer (:func:`unsupported_reason`), the operands or the configuration do not fit."""
    check_q4_operands(x2, packed, bias, DTYPES, MAX_TOKENS, "q4 mma kernel")
    why = unsupported_reason(packed)
    if why is not None:
        raise ValueError(f"q4 mma kernel: {why}")
    M = x2.shape[0]
    launch = _prepared(packed, M, x2.dtype, bias is not None, warps, split, sb, qst)
    out = torch.empty(M, packed.out_features, dtype=x2.dtype, device=x2.device)
    launch(x2, out, bias)
    return out


__all__ = ["MmaQ4Key", "default_config", "launch_plan", "layer_config", "layout_reason", "mma_q4_supported",
           "param_table", "prepare", "q4_mma_linear", "unsupported_reason", "DISPATCH_GROUPS", "DISPATCH_TOKENS"]
