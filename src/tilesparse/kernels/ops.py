"""``hybrid_linear``: dispatch, per-shape autotuning and launching of the hybrid kernels.

Paths (chosen per call):

* ``"dense"`` -- the layer has only dense tiles and ``dn_vals`` is ``W``: ``F.linear`` on that view
  (cuBLAS, no extra memory).
* ``"stream"`` (up to 64 tokens) -- ``hybrid_stream_kernel`` (:mod:`.triton_stream`): long-lived
  programs that each walk ``BN`` rows of a tile-row in large chunks with the next chunk's loads in flight;
  one token by FMA without expanding the 2:4 values, more tokens by tensor cores on four position planes.
* ``"mma"`` (v7 ``mode`` 0, v9 ``mode`` 9 on sm_90; up to 64 tokens) -- :mod:`.cuda_mma`: CUDA
  C++ (NVRTC) on sparse tensor cores: 2:4 tiles by ``mma.sp`` straight from the stored values and positions,
  dense tiles by ``mma``; GPU only.
* ``"gemm"`` (16-64 tokens) -- :mod:`.cuda_gemm`: the layer as a GEMM on sparse tensor cores (weights and x
  staged in shared memory once per block, ``ldmatrix`` operands); GPU only. It runs 256 and 2048 tokens too,
  but slower than ``"unpack"`` there (``benchmarks/results/gemm_v10_h100.md``), so it is not offered above 64.
* ``"columns"`` (16 tokens and more) -- :mod:`.tilelang_columns`: a column-shared layer (every tile-column 2:4 in
  all tile-rows or dense in all; ``tile_map="columns"`` masks) as two TileLang GEMMs, ``T.gemm_sp`` on the 2:4
  columns and a dense GEMM (or cuBLAS) adding the dense ones; compute capability 9.0 with TileLang installed.
* ``"unpack"`` (more than 64 tokens, and the fallback for any tile size) -- ``unpack_kernel``
  (:mod:`.triton_hybrid`) unpacks the layer on the GPU into a *transient* scratch buffer (one per device and
  dtype, as large as the largest layer it has served; reused by every layer) and ``F.linear`` runs on it.
  Its resident cost is that one buffer, reported by :func:`workspace_bytes`. (Unless ``TILESPARSE_COMPILED_UNPACK=0``,
  a compiled graph does the same without this dispatcher: ``F.linear`` on the ``tilesparse::hybrid_unpack``
  operator's output, see ``HybridLinear._compiled_forward``.)

Choice: autotuned on the first call per (layer shape, tile size, sparse-fraction bucket, token-count
bucket, dtype, bias) by timing every candidate with a cold L2 inside CUDA graphs (:func:`time_cold`),
cached for the process. Outside tuning (``TILESPARSE_AUTOTUNE=0``, CPU interpreter, or during CUDA
graph capture) :func:`heuristic_config` picks: ``"dense"`` for an all-dense layer, the stream kernel at
1-64 tokens where it fits the tiles, ``"unpack"`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch

from ..settings import setting
from . import cuda_gemm as _cg
from . import cuda_mma as _cm
from . import tilelang_columns as _tc
from .format import PackedHybrid

try:  # triton is optional: without it everything runs through the torch reference
    from . import triton_hybrid as _tk
    from . import triton_stream as _ts

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    _tk = _ts = None
    HAVE_TRITON = False

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelConfig:
    """One way to run a layer: ``path`` is ``"stream"``, ``"mma"``, ``"dense"`` or ``"unpack"``; the other
    fields (keyword-only) are the kernel's parameters (``bm`` tokens / ``bn`` weight rows per block)."""

    path: str = "stream"
    _: dataclasses.KW_ONLY
    mode: int = 1
    bm: int = 16
    bn: int = 32
    split: int = 1
    warps: int = 4
    # path "stream" (``hybrid_stream_kernel``): ``mode`` 0 = FMA (one token), 1 = tensor cores with the
    # 2:4 planes built by selects, 2 = the same with an inline-PTX shift expansion (GPU); ``ts``/``td`` = 2:4 /
    # dense tiles per chunk, ``pref`` = next chunk's loads in flight, ``split`` = programs per row block.
    # path "mma" mode 0 (v7): ``ts`` = steps per batch; mode 9 (v9): ``ts`` = shared-memory stages, ``nit`` =
    # steps per work item, ``warps`` = consumer warps. Path "gemm": ``bm`` tokens and ``bn`` weight rows per
    # block, ``warps`` x ``nit`` warps (along the rows x the tokens), ``ts`` shared-memory stages.
    ts: int = 0
    nit: int = 1
    td: int = 0
    pref: int = 0
    xt: int = 0  # stream: x loaded per tile ([BM, T, TILE_C]) instead of per position
    occ: int = 1
    pdl: int = 0
    # path "columns" (:class:`.tilelang_columns.ColumnConfig`): ``bm`` tokens and ``bn`` weight rows per block,
    # ``nit`` tile-columns per 2:4 step, ``ts`` stages, ``warps`` x 32 threads, ``mode`` 1 = square warp policy
    # (0: full rows), ``td`` 1 = the dense columns by cuBLAS (0: TileLang), ``split`` ranges of the 2:4 steps,
    # ``occ`` resident 2:4 blocks per SM asked of nvcc, ``pdl`` 1 = the dense kernel as a dependent launch.

    def short(self) -> str:
        if self.path == "mma":
            if self.mode == 9:
                return f"mma9 bm{self.bm} w{self.warps} s{self.split} n{self.ts} p{self.nit}"
            return f"mma bm{self.bm} w{self.warps} s{self.split} sb{self.ts}"
        if self.path == "gemm":
            return f"gemm bm{self.bm} bn{self.bn} w{self.warps}x{self.nit} s{self.split} n{self.ts}"
        if self.path == "columns":
            return (f"columns bm{self.bm} bn{self.bn} k{self.nit} n{self.ts} w{self.warps}"
                    f"{' sq' if self.mode else ''} {'cublas' if self.td else 'tl'}"
                    + (f" s{self.split}" if self.split > 1 else "") + (f" occ{self.occ}" if self.occ > 1 else "")
                    + (" pdl" if self.pdl else ""))
        if self.path == "stream":
            m = {0: "fma", 1: "dot", 2: "dotasm"}.get(self.mode, str(self.mode))
            return (f"stream-{m} bm{self.bm} bn{self.bn} ts{self.ts} td{self.td} s{self.split} "
                    f"w{self.warps} p{self.pref}" + (" xt" if self.xt else ""))
        return self.path


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_supported(packed: PackedHybrid) -> bool:
    """True when the Triton kernels (stream / unpack) can take this layer: 16-bit weights and tile sizes that
    are multiples of 16 (:func:`heuristic_config` has a configuration for every such layer)."""
    return (HAVE_TRITON and packed.dtype in KERNEL_DTYPES
            and packed.tile_rows % 16 == 0 and packed.tile_cols % 16 == 0)


def _pow2_at_least(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def _largest_pow2_divisor_le(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _fit(cfg: KernelConfig, packed: PackedHybrid) -> KernelConfig | None:
    """Clamp block sizes to the tile size; ``None`` if the config cannot run on this layer."""
    if cfg.path == "stream":
        return _fit_stream(cfg, packed)
    if cfg.path == "mma":
        return _fit_mma(cfg, packed)
    if cfg.path == "gemm":
        return _fit_gemm(cfg, packed)
    if cfg.path == "columns":
        return _fit_columns(cfg, packed)
    if cfg.path in ("dense", "unpack"):
        return cfg
    return None


def _fit_stream(cfg: KernelConfig, packed: PackedHybrid) -> KernelConfig | None:
    TC = packed.tile_cols
    if not _is_pow2(TC) or cfg.mode not in (0, 1, 2) or cfg.split < 1:
        return None
    bn = _largest_pow2_divisor_le(packed.tile_rows, cfg.bn)
    ts, td, mode = max(1, cfg.ts), max(1, cfg.td), cfg.mode
    if mode == 0:
        if cfg.bm != 1:
            return None
    else:
        if bn < 32 or cfg.bm < 16:  # tensor cores: 32+ weight rows (16-row blocks give wrong results on the H100)
            return None
        while ts * TC < 64:  # planes of >= 16 groups (the dot's K)
            ts *= 2
        while td * TC < 32:
            td *= 2
        if mode == 2 and interpreting():
            mode = 1  # inline PTX does not run on the CPU interpreter
    return KernelConfig("stream", mode=mode, bm=cfg.bm, bn=bn, split=cfg.split, warps=cfg.warps, ts=ts, nit=1,
                        td=td, pref=1 if cfg.pref else 0, xt=1 if cfg.xt else 0)


def _fit_mma(cfg: KernelConfig, packed: PackedHybrid) -> KernelConfig | None:
    if interpreting() or cfg.mode not in (0, 9) or not _cm.mma_supported(packed) or cfg.split < 1 or cfg.ts < 1:
        return None
    warps = _largest_pow2_divisor_le(packed.tile_rows // 16, cfg.warps)
    bm = 8 * _cm.octets(min(cfg.bm, _cm.MAX_TOKENS))
    steps = -(-packed.in_features // 64)  # 64-column steps of a full tile-row
    if cfg.mode == 9:  # v9: work items of spb steps through ts shared-memory stages (sm_90)
        spb = cfg.nit
        if not _cm.v9_available(packed.device) or not _cm.v9_fits(spb, _cm.octets(bm), warps, cfg.ts) \
                or packed.sp_meta.data_ptr() % 16:
            return None
        try:
            _cm.v9_plan(packed, spb, warps, _cm.octets(bm), cfg.ts)
        except ValueError:  # too many items per block
            return None
        split = _cm.item_table(packed, spb)[1]
        return KernelConfig("mma", mode=9, bm=bm, bn=16 * warps, split=split, warps=warps, ts=cfg.ts, nit=spb)
    if _cm.octets(bm) * cfg.ts > 16:  # static shared memory: 2 * sb * octets KB
        return None
    split = cfg.split
    while steps > _cm.MAX_STEPS * split:  # 64-column steps per block
        split *= 2
    return KernelConfig("mma", mode=0, bm=bm, bn=16 * warps, split=split, warps=warps, ts=cfg.ts)


def _fit_gemm(cfg: KernelConfig, packed: PackedHybrid) -> KernelConfig | None:
    if interpreting() or not _cm.mma_supported(packed) or cfg.split < 1:
        return None
    limit = torch.cuda.get_device_properties(packed.device).shared_memory_per_block_optin
    if _cg.shape_reason(cfg.bn, cfg.bm, cfg.warps, cfg.nit, cfg.ts, packed.tile_rows, limit) is not None:
        return None
    split = cfg.split
    while -(-packed.in_features // 64) > _cg.MAX_STEPS * split:
        split *= 2
    return dataclasses.replace(cfg, split=split, td=0, pref=0, xt=0, mode=0)


def column_config(cfg: KernelConfig) -> _tc.ColumnConfig:
    """The :class:`.tilelang_columns.ColumnConfig` a ``"columns"`` :class:`KernelConfig` stands for."""
    return _tc.ColumnConfig(toks=cfg.bm, rows=cfg.bn, tpk=cfg.nit, stages=cfg.ts, threads=32 * cfg.warps,
                            square=bool(cfg.mode), dense_cublas=bool(cfg.td), splits=cfg.split,
                            blocks_per_sm=cfg.occ, pdl=bool(cfg.pdl))


def column_candidates(M: int) -> list[KernelConfig]:
    """The TileLang column GEMMs' candidates for ``M >= 16`` tokens (:func:`.tilelang_columns.candidates`)."""
    return [KernelConfig("columns", mode=int(c.square), bm=c.toks, bn=c.rows, warps=c.threads // 32, ts=c.stages,
                         nit=c.tpk, td=int(c.dense_cublas), split=c.splits, occ=c.blocks_per_sm, pdl=int(c.pdl))
            for c in _tc.candidates(M)]


_COLUMNS_OK: dict = {}


def columns_available(device) -> bool:
    """Whether the TileLang route can run on ``device`` (checked once per device)."""
    key = str(device)
    if key not in _COLUMNS_OK:
        _COLUMNS_OK[key] = not interpreting() and _tc.available(device)
    return _COLUMNS_OK[key]


def columns_route(packed: PackedHybrid) -> bool:
    """Whether the column-shared layers' TileLang GEMMs can run ``packed``: a column-shared layer they take, on a
    CUDA device where TileLang runs (whether they are offered is :data:`COLUMNS_CANDIDATES`)."""
    return (packed.device.type == "cuda" and columns_available(packed.device)
            and _tc.column_layout(packed) is not None)


def _fit_columns(cfg: KernelConfig, packed: PackedHybrid) -> KernelConfig | None:
    if not columns_route(packed) or not _tc.fits(_tc.column_layout(packed), column_config(cfg)):
        return None
    return dataclasses.replace(cfg, pref=0, xt=0)


def gemm_candidates(M: int) -> list[KernelConfig]:
    """The hybrid GEMM's candidate configurations for ``M`` tokens: tokens per block (16 up to 16 tokens, else
    32 and 64) x 64 weight rows per block x warps (2 x 2, 4 x 2) x 4 shared-memory stages x split-K (1, 2, 4),
    the region where its fastest configurations fell on the H100 (``benchmarks/spikes/gemm_route/v10.py``);
    the shapes that a layer's tiles or the device's shared memory do not take are dropped when fitted."""
    bts = (16,) if M <= 16 else (32, 64)
    return [KernelConfig("gemm", bm=bt, bn=64, warps=wm, nit=wn, ts=4, split=split)
            for bt in bts for wm, wn in ((2, 2), (4, 2)) for split in (1, 2, 4)
            if _cg.shape_reason(64, bt, wm, wn, 4, 64, 1 << 30) is None]


def mma_candidates(M: int) -> list[KernelConfig]:
    """The sparse-tensor-core kernels' candidate configurations for ``M <= 64`` tokens: v7 (warps, split,
    steps per batch) and v9 (:func:`v9_candidates`)."""
    bm = 8 * _cm.octets(M)
    v7 = [KernelConfig("mma", mode=0, bm=bm, bn=0, split=split, warps=w, ts=sb)
          for w in (4, 8) for split in (1, 2, 4, 8, 16) for sb in (1, 2)]
    return v7 + v9_candidates(M)


def mma_keys(M: int, bf16: bool = True, bias: bool = False) -> list:
    """The compiled kernels (:class:`.cuda_mma.MmaKey`) that the mma candidates for ``M`` tokens launch, for
    :func:`.cuda_mma.precompile` (v9 only where it can run)."""
    return list(dict.fromkeys(  # (v7's candidates of different split share a kernel)
        _cm.make_key(bf16, M, c.warps, c.ts, bias, 9 if c.mode == 9 else 7, c.nit)
        for c in mma_candidates(M) if c.mode != 9 or _cm.v9_available()))


def v9_candidates(M: int) -> list[KernelConfig]:
    """v9 (sm_90): consumer warps x steps per work item, each with as many stages (<= 6) as shared memory
    holds for one block per SM, and with as many as it holds for two (when that is at least two stages)."""
    bm, noct = 8 * _cm.octets(M), _cm.octets(M)
    c = []
    for w in (4, 8):
        for spb in (2, 4, 8):
            fit = [n for n in range(2, 7) if _cm.v9_fits(spb, noct, w, n)]
            two = [n for n in fit if _cm.v9_blocks_per_sm(spb, noct, w, n) >= 2]
            for nst in sorted({max(fit, default=0), max(two, default=0)} - {0}):
                c.append(KernelConfig("mma", mode=9, bm=bm, bn=0, split=1, warps=w, ts=nst, nit=spb))
    return c


def stream_candidates(M: int) -> list[KernelConfig]:
    """The stream kernel's candidate configurations for ``M <= 64`` tokens."""
    c = []

    def T(mode, bm, bn, ts, td, w, pref, split, xt=0):
        return KernelConfig("stream", mode=mode, bm=bm, bn=bn, split=split, warps=w, ts=ts, td=td, pref=pref, xt=xt)
    if M == 1:
        for bn, ts, td, w, pref, split in ((8, 4, 4, 4, 1, 1), (8, 4, 2, 4, 1, 1), (16, 2, 2, 8, 0, 1),
                                           (16, 2, 2, 4, 0, 1), (8, 8, 4, 4, 0, 1), (16, 8, 4, 4, 0, 1),
                                           (8, 2, 2, 8, 1, 1), (4, 4, 4, 4, 1, 1), (8, 4, 4, 4, 1, 2),
                                           (16, 4, 2, 8, 1, 1), (8, 4, 1, 4, 1, 1), (8, 8, 2, 4, 0, 1),
                                           (16, 4, 1, 4, 0, 1)):
            c.append(T(0, 1, bn, ts, td, w, pref, split))
        for bn, ts, td, w, pref in ((8, 8, 4, 4, 0), (8, 4, 1, 4, 1), (8, 8, 2, 4, 0), (16, 4, 2, 8, 1)):
            c.append(T(0, 1, bn, ts, td, w, pref, 1, 1))
    bm = _pow2_at_least(M, 16)
    for mode in (2, 1):
        for bn, ts, td, w, pref, split in ((64, 2, 1, 4, 1, 4), (64, 2, 2, 8, 1, 4), (32, 2, 1, 4, 1, 4),
                                           (64, 2, 1, 4, 0, 4), (32, 1, 1, 4, 1, 4), (64, 2, 1, 8, 1, 2),
                                           (64, 1, 1, 4, 1, 4), (64, 2, 1, 4, 1, 1)):
            c.append(T(mode, bm, bn, ts, td, w, pref, split))
    for bn, ts, td, w, pref, split in ((64, 1, 1, 4, 1, 4), (32, 1, 1, 4, 1, 4), (64, 1, 1, 4, 1, 2),
                                       (64, 2, 1, 8, 1, 4)):
        c.append(T(2, bm, bn, ts, td, w, pref, split, 1))
    return c


def heuristic_config(M: int, packed: PackedHybrid) -> KernelConfig:
    """The configuration used without tuning (``TILESPARSE_AUTOTUNE=0``, the CPU interpreter, an unseen key
    during CUDA-graph capture). It runs on every layer :func:`kernel_supported` accepts:

    * a layer of dense tiles only (``dn_vals`` is ``W``): ``"dense"``;
    * 1 token, tile width a power of two: the stream kernel's FMA mode (the H100's 1-token winner's chunks);
    * 2-64 tokens, tile width a power of two, tile rows a multiple of 32: the stream kernel on tensor cores,
      mode 1 (the 2:4 planes built by selects: portable Triton, no inline PTX);
    * anything else (more than 64 tokens, other tile widths, tile rows not a multiple of 32 at 2+ tokens):
      ``"unpack"`` (``unpack_kernel`` takes any tile size that is a multiple of 16).
    """
    if packed.is_plain_dense():
        return KernelConfig("dense")
    if M <= 64:
        if M == 1:
            cfg = KernelConfig("stream", mode=0, bm=1, bn=8, split=1, warps=4, ts=8, td=4, pref=0, xt=1)
        else:
            cfg = KernelConfig("stream", mode=1, bm=_pow2_at_least(M, 16), bn=64, split=4, warps=4, ts=1, td=1,
                               pref=1)
        fitted = _fit_stream(cfg, packed)
        if fitted is not None:
            return fitted
    return KernelConfig("unpack")


UNPACK_ABOVE = 64  # above this many tokens a layer is unpacked and multiplied by F.linear (no other candidate)

# Which kernel families the autotuner considers (read once, at import; see :mod:`tilesparse.settings`):
# the streaming kernel (``hybrid_stream_kernel``) for M <= 64 tokens
STREAM_CANDIDATES = setting("stream")
# the v7 / v9 sparse-tensor-core kernels (:mod:`.cuda_mma`) for M <= 64 tokens (CUDA, sm_80+; v9 sm_90)
MMA_CANDIDATES = setting("mma")
# the hybrid GEMM (:mod:`.cuda_gemm`) for 16-64 tokens (CUDA, sm_80+)
GEMM_CANDIDATES = setting("gemm")
# the TileLang GEMMs of column-shared layers (:mod:`.tilelang_columns`) for 16+ tokens (sm_90, TileLang)
COLUMNS_CANDIDATES = setting("tilelang")


def candidate_configs(M: int, packed: PackedHybrid, force_kernel: bool = False) -> list[KernelConfig]:
    """Configurations the autotuner times for ``M`` tokens, each fitted to the layer: at 1-64 tokens the mma
    and stream kernels' candidates that fit, at 16-64 tokens the GEMM's too, from 16 tokens up the TileLang
    GEMMs of a column-shared layer, above 64 tokens (or where none of those fits) ``"unpack"`` as well; a plain
    dense layer only ``"dense"`` (``force_kernel``: the kernels' too, for benchmarks)."""
    c: list[KernelConfig] = []
    if packed.is_plain_dense():
        if not force_kernel:
            return [KernelConfig("dense")]
        c.append(KernelConfig("dense"))
    if M <= 64 and MMA_CANDIDATES and _cm.available(packed.device):
        c += mma_candidates(M)
    if M <= 64 and STREAM_CANDIDATES:
        c += stream_candidates(M)
    if 16 <= M <= 64 and GEMM_CANDIDATES and _cm.available(packed.device):
        c += gemm_candidates(M)
    if M >= 16 and COLUMNS_CANDIDATES and columns_route(packed):
        c += column_candidates(M)
    out, seen = [], set()
    for cfg in c:
        f = _fit(cfg, packed)
        if f is not None and f not in seen:
            seen.add(f)
            out.append(f)
    if M > UNPACK_ABOVE or all(f.path == "dense" for f in out):
        out.append(KernelConfig("unpack"))
    return out


# ---------------------------------------------------------------- workspaces (per device)
_WS: dict = {}
_KEEP: list = []  # buffers ever handed out stay alive (CUDA graphs may still point at them)


def _buffer(kind: str, device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    key = (kind, str(device), dtype)
    buf = _WS.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(numel, dtype=dtype, device=device)
        _WS[key] = buf
        _KEEP.append(buf)
    return buf


def workspace_bytes(device=None) -> int:
    """Bytes held by the transient workspaces (split-K partials and arrival counters, unpack scratch; not the
    autotuner's L2-flush buffer, which :func:`release_workspaces` frees)."""
    return sum(b.numel() * b.element_size() for (k, d, _), b in _WS.items()
               if k != "flush" and (device is None or d == str(device)))


def release_workspaces() -> None:
    """Drop the cached workspaces (only safe when no captured CUDA graph still uses them)."""
    _WS.clear()
    _KEEP.clear()
    _TUNED._bump()  # prepared launches hold workspaces: rebuild them


# ---------------------------------------------------------------- launching
def launch_stream(x2: torch.Tensor, packed: PackedHybrid, bias, cfg: KernelConfig, out: torch.Tensor) -> None:
    """Run ``hybrid_stream_kernel`` with ``cfg`` on ``x2 [M, K]`` (M <= cfg.bm) into ``out [M, N]``."""
    M = x2.shape[0]
    N = packed.out_features
    if M > cfg.bm:
        raise ValueError(f"stream kernel: {M} tokens > bm={cfg.bm}")
    grid0 = packed.grid.n_rows * (packed.tile_rows // cfg.bn)
    dev = x2.device
    if cfg.split > 1:
        ws = _buffer("stream_ws", dev, cfg.split * M * N, torch.float32)
        cnt = _buffer("stream_cnt", dev, grid0, torch.int32)
    else:
        ws = cnt = out  # unused
    _ts.hybrid_stream_kernel[(grid0, cfg.split)](
        x2, out, bias if bias is not None else out, ws, cnt,
        packed.sp_vals, packed.sp_vals.view(torch.int32), packed.sp_meta, packed.dn_vals, packed.sp_cols, packed.sp_ptr,
        packed.dn_cols, packed.dn_ptr, packed.row_info,
        M, N, x2.stride(0), x2.stride(1), out.stride(0),
        TILE_R=packed.tile_rows, TILE_C=packed.tile_cols, BM=cfg.bm, BN=cfg.bn, TS=cfg.ts, TD=cfg.td,
        SPLIT=cfg.split, PREF=bool(cfg.pref), DOT=cfg.mode != 0, ASM=cfg.mode == 2 and not interpreting(),
        HAS_BIAS=bias is not None, F32=interpreting(), EVEN=packed.in_features % packed.tile_cols == 0,
        XT=bool(cfg.xt), num_warps=cfg.warps, num_stages=1,
    )


def prepare_mma(packed: PackedHybrid, cfg: KernelConfig, M: int, has_bias: bool) -> "_cm.MmaLaunch":
    """The v7 / v9 kernel (:mod:`.cuda_mma`) with ``cfg`` prepared for ``M`` tokens, its split-K
    workspaces bound: call it with ``(x2, out, bias)``."""
    if M > cfg.bm:
        raise ValueError(f"mma kernel: {M} tokens > bm={cfg.bm}")
    ws = cnt = None
    if cfg.split > 1:
        ws = _buffer("mma_ws", packed.device, M * packed.out_features, torch.float32)
        cnt = _buffer("mma_cnt", packed.device, packed.grid.n_rows * (packed.tile_rows // cfg.bn), torch.int32)
    return _cm.prepare(packed, M, has_bias, cfg.warps, cfg.split, cfg.ts, ws, cnt, 9 if cfg.mode == 9 else 7,
                       cfg.nit)


def prepare_gemm(packed: PackedHybrid, cfg: KernelConfig, M: int, has_bias: bool) -> "_cm.MmaLaunch":
    """The hybrid GEMM (:mod:`.cuda_gemm`) with ``cfg`` prepared for ``M`` tokens, its split-K workspaces
    bound: call it with ``(x2, out, bias)``."""
    ws = cnt = None
    if cfg.split > 1:
        ws = _buffer("mma_ws", packed.device, M * packed.out_features, torch.float32)
        blocks = packed.grid.n_rows * (packed.tile_rows // cfg.bn) * -(-M // cfg.bm)
        cnt = _buffer("gemm_cnt", packed.device, blocks, torch.int32)
    return _cg.prepare(packed, M, has_bias, cfg.bn, cfg.bm, cfg.warps, cfg.nit, cfg.ts, cfg.split, ws, cnt)


def prepare_columns(packed: PackedHybrid, cfg: KernelConfig):
    """The TileLang column GEMMs (:mod:`.tilelang_columns`) with ``cfg``, compiled and bound to the layer:
    ``fn(x2, bias) -> out``."""
    layout = _tc.column_layout(packed)
    if layout is None:
        raise ValueError(f"not a column-shared layer the TileLang route takes: {_tc.column_reason(packed)}")
    launch = _tc.prepare(layout, column_config(cfg), packed.dtype)
    N = packed.out_features

    def run(x2, bias):
        x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], N, dtype=x2.dtype, device=x2.device)
        launch(x2, out)
        if bias is not None:
            out += bias
        return out
    return run


def launch_mma(x2: torch.Tensor, packed: PackedHybrid, bias, cfg: KernelConfig, out: torch.Tensor) -> None:
    """Run the v7 / v9 kernel (:mod:`.cuda_mma`) with ``cfg`` on ``x2 [M, K]`` into ``out [M, N]``."""
    prepare_mma(packed, cfg, x2.shape[0], bias is not None)(x2, out, bias)


def unpack_triton(packed: PackedHybrid, out: torch.Tensor | None = None, bn: int = 32, bk: int = 64) -> torch.Tensor:
    """Dense masked weight ``[out, in]`` unpacked on the device by ``unpack_kernel``."""
    N, K = packed.shape
    if out is None:
        out = torch.empty(N, K, dtype=packed.dtype, device=packed.device)
    grid, args, consts = unpack_launch(out, vars(packed), N, K, packed.tile_rows, packed.tile_cols, bn, bk)
    _tk.unpack_kernel[grid](*args, **consts)
    return out


def unpack_launch(out: torch.Tensor, tensors, N: int, K: int, tile_rows: int, tile_cols: int, bn: int = 32,
                  bk: int = 64) -> tuple:
    """``unpack_kernel``'s launch for an ``N x K`` layer of ``tile_rows x tile_cols`` tiles writing ``out``:
    ``(grid, args, constexprs)``, the layer's tensors taken by name from the mapping ``tensors`` (``BN`` / ``BK``:
    the largest powers of two dividing the tile, at most ``bn`` / ``bk``)."""
    bn = _largest_pow2_divisor_le(tile_rows, bn)
    bk = _largest_pow2_divisor_le(tile_cols, bk)
    if bk < 8:
        raise ValueError(f"tile_cols={tile_cols} too small for unpack_kernel")
    grid = (-(-N // tile_rows) * (tile_rows // bn), -(-K // tile_cols))
    args = (out, *(tensors[n] for n in ("sp_vals", "sp_meta", "dn_vals", "tile_kinds", "tile_slot", "row_info")),
            N, K, grid[1])
    return grid, args, {"TILE_R": tile_rows, "TILE_C": tile_cols, "BN": bn, "BK": bk}


def run_config(x2: torch.Tensor, packed: PackedHybrid, bias, cfg: KernelConfig) -> torch.Tensor:
    """Compute ``x2 @ W^T (+ bias)`` with one explicit configuration; returns ``[M, N]``."""
    N, K = packed.shape
    if cfg.path == "dense":
        return torch.nn.functional.linear(x2, packed.dense_view(), bias)
    if cfg.path == "unpack":
        scratch = _buffer("scratch", x2.device, N * K, packed.dtype)[: N * K].view(N, K)
        unpack_triton(packed, scratch)
        return torch.nn.functional.linear(x2, scratch, bias)
    if cfg.path not in ("stream", "mma", "gemm", "columns"):
        raise ValueError(f"unknown kernel path {cfg.path!r}")
    if cfg.path == "columns":
        return prepare_columns(packed, cfg)(x2, bias)
    out = torch.empty(x2.shape[0], N, dtype=x2.dtype, device=x2.device)
    if cfg.path == "stream":
        launch_stream(x2, packed, bias, cfg, out)
    elif cfg.path == "gemm":
        prepare_gemm(packed, cfg, x2.shape[0], bias is not None)(x2, out, bias)
    else:
        launch_mma(x2, packed, bias, cfg, out)
    return out


# ---------------------------------------------------------------- autotuning
class _TuneTable(dict):
    """The tuned choices, ``tune_key -> KernelConfig``; ``gen`` counts its changes (and workspace releases):
    the per-layer launch caches of :func:`hybrid_linear` are rebuilt when it moves."""

    gen = 0

    def _bump(self) -> None:
        self.gen += 1

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        self._bump()

    def __delitem__(self, k):
        super().__delitem__(k)
        self._bump()

    def clear(self):
        super().clear()
        self._bump()

    def pop(self, *a):
        self._bump()
        return super().pop(*a)

    def update(self, *a, **kw):
        super().update(*a, **kw)
        self._bump()

    def setdefault(self, k, v=None):
        self._bump()
        return super().setdefault(k, v)


_TUNED: _TuneTable = _TuneTable()


def _m_bucket(M: int) -> int:
    return _pow2_at_least(M)


def tune_key(M: int, packed: PackedHybrid, has_bias: bool) -> tuple:
    return (packed.out_features, packed.in_features, packed.tile_rows, packed.tile_cols,
            round(packed.sparse_fraction() * 4), _m_bucket(M), str(packed.dtype), str(packed.device), has_bias,
            packed.is_plain_dense())


def _flush_buffer(device) -> torch.Tensor:
    key = ("flush", str(device), torch.uint8)
    if key not in _WS:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        _WS[key] = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    return _WS[key]


def time_cold(fn, device, reps: int = 10, rounds: int = 7) -> float:
    """Median time (ms) of ``fn`` with a cold L2, launch gaps removed: a CUDA graph of ``reps`` x
    (L2 flush, fn) minus one of ``reps`` x (L2 flush)."""
    flush = _flush_buffer(device)
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(g)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = {0: [], 1: []}
    for _ in range(rounds):
        for i, g in enumerate(graphs):
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            ts[i].append(e0.elapsed_time(e1))
    ts0, ts1 = sorted(ts[0]), sorted(ts[1])
    return max(1e-6, (ts0[len(ts0) // 2] - ts1[len(ts1) // 2]) / reps)


def host_time(fn, reps: int = 25) -> float:
    """Host time (ms) per call of ``fn`` when called back to back without synchronizing: the launch cost an
    eager caller pays (a call the GPU cannot keep up with waits for it, which counts too)."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / reps


EAGER_SHORTLIST = 6  # eager choice: the candidates fastest on the device whose launch cost is measured


def eager_pick(device_ms: dict, host_ms: dict) -> KernelConfig:
    """The configuration for eager calls: the least ``max(device time, host time)`` -- an eager call costs
    whichever of its launch and its kernel is longer -- among those with a host time, ties to the device's
    choice."""
    return min(host_ms, key=lambda c: (max(device_ms[c], host_ms[c]), device_ms[c]))


def autotune(x2: torch.Tensor, packed: PackedHybrid, bias, verbose: bool = False,
             force_kernel: bool = False) -> tuple[KernelConfig, dict]:
    """Time every candidate on these inputs (cold L2, CUDA graphs; see :func:`time_cold`) and return
    the fastest and the times. A progress bar shows on a terminal: the first use of a shape on a machine also
    compiles each candidate's kernel, which can take minutes for a model."""
    from tqdm.auto import tqdm

    times = {}
    cands = candidate_configs(x2.shape[0], packed, force_kernel)
    col = [column_config(c) for c in cands if c.path == "columns"]
    if col:  # TileLang compiles with nvcc: the candidates' kernels in parallel first
        has_dense = _tc.column_layout(packed).n_dn > 0
        _tc.precompile([k for c in col for k in _tc.launch_keys(c, packed.tile_cols, packed.dtype, has_dense)])
    desc = (f"tilesparse: tuning {packed.out_features}x{packed.in_features} for {x2.shape[0]} token"
            f"{'s' if x2.shape[0] != 1 else ''} (once per GPU model; cached)")
    for cfg in tqdm(cands, desc=desc, unit="config", leave=False, disable=None, dynamic_ncols=True):
        try:
            run_config(x2, packed, bias, cfg)
            torch.cuda.synchronize()
            times[cfg] = time_cold(lambda: run_config(x2, packed, bias, cfg), x2.device)
        except Exception as e:  # a config that fails to compile/launch (e.g. out of shared memory)
            if "CUDA" in str(e) and "illegal" in str(e).lower():  # a faulting kernel poisons the context
                raise RuntimeError(f"kernel configuration {cfg.short()} faulted: {e}") from e
            if verbose:
                print(f"  skip {cfg.short()}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if not times:
        raise RuntimeError("no kernel configuration could run for this layer")
    best = min(times, key=times.get)
    return best, times


def autotune_eager(x2: torch.Tensor, packed: PackedHybrid, bias, device_ms: dict) -> KernelConfig:
    """The eager calls' choice (:func:`eager_pick`) among the :data:`EAGER_SHORTLIST` candidates fastest on the
    device and the fastest of each path (launch costs differ most between paths), their host time measured
    through the prepared launches that eager calls use."""
    ranked = sorted(device_ms, key=device_ms.get)
    best_of_path: dict[str, KernelConfig] = {}
    for c in ranked:
        best_of_path.setdefault(c.path, c)
    short = list(dict.fromkeys(ranked[:EAGER_SHORTLIST] + list(best_of_path.values())))
    host = {}
    for cfg in short:
        run = _prepared_runner(packed, cfg, x2.shape[0], bias is not None)
        host[cfg] = host_time(lambda: run(x2, bias))
    return eager_pick(device_ms, host)


def choose_config(x2: torch.Tensor, packed: PackedHybrid, bias, eager: bool = False) -> KernelConfig:
    """The cached, tuned or heuristic configuration for this call: this process's choice, else one an earlier
    process tuned on this GPU (:class:`TuneStore`), else a new tuning run (kept in both), else the heuristic.
    Tuning keeps two choices: the fastest on the device (CUDA-graph replays, where launches cost nothing) and,
    for ``eager`` calls, the one whose kernel or launch, whichever is longer, is shortest."""
    key = tune_key(x2.shape[0], packed, bias is not None)
    want = key + ("eager",) if eager else key
    cfg = _TUNED.get(want)
    if cfg is not None:
        return cfg
    can_tune = (x2.is_cuda and not interpreting() and setting("autotune")
                and not torch.cuda.is_current_stream_capturing())
    if not can_tune:
        cfg = heuristic_config(x2.shape[0], packed)
        # a call captured into a CUDA graph may be the first to use a workspace, which the graph would only
        # zero at its replays: no split-K (whose counters must start at zero) there
        return cfg if eager else dataclasses.replace(cfg, split=1)
    store = TuneStore.for_device(x2.device) if setting("autotune_cache") else None
    got = {k: store.get(k) if store is not None else None for k in (key, key + ("eager",))}
    if any(c is None or _fit(c, packed) is None for c in got.values()):
        best, times = autotune(x2, packed, bias)
        got = {key: best, key + ("eager",): autotune_eager(x2, packed, bias, times)}
        if store is not None:
            for k, c in got.items():
                store.put(k, c)
    _TUNED.update(got)
    return got[want]


class TuneStore:
    """Tuned choices kept on disk, one JSON file per GPU model (``<cache>/autotune/``), valid for the versions
    of tilesparse, torch and Triton that made them (another version starts a fresh file). Keys are
    :func:`tune_key` without the device index; a damaged file is ignored and replaced."""

    _open: dict[str, "TuneStore"] = {}

    def __init__(self, path, versions: dict):
        self.path, self.versions = path, versions
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("versions") == versions:
                self.entries = dict(data.get("entries", {}))
        except (OSError, ValueError, AttributeError):
            pass

    @classmethod
    def for_device(cls, device) -> "TuneStore":
        import re

        import triton

        from .. import __version__
        from ..paths import cache_dir

        name = torch.cuda.get_device_name(device)
        cc = "".join(map(str, torch.cuda.get_device_capability(device)))
        path = cache_dir() / "autotune" / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-sm{cc}.json"
        versions = {"tilesparse": __version__, "torch": torch.__version__, "triton": triton.__version__}
        store = cls._open.get(str(path))
        if store is None or store.versions != versions:
            store = cls._open[str(path)] = cls(path, versions)
        return store

    @staticmethod
    def _key(key: tuple) -> str:
        k = list(key)
        k[7] = str(k[7]).split(":")[0]  # the device's type, not its index: the file is per GPU model
        return json.dumps(k)

    def get(self, key: tuple) -> KernelConfig | None:
        entry = self.entries.get(self._key(key))
        if entry is None:
            return None
        try:
            return KernelConfig(**entry)
        except TypeError:  # fields of another KernelConfig
            return None

    def put(self, key: tuple, cfg: KernelConfig) -> None:
        from ..atomic import atomic_write_text

        self.entries[self._key(key)] = dataclasses.asdict(cfg)
        try:
            atomic_write_text(json.dumps({"versions": self.versions, "entries": self.entries}, indent=0),
                              self.path)
        except OSError:  # a read-only cache: keep the choice for this process only
            pass


def clear_tuning_cache() -> None:
    """Forget every tuned choice."""
    _TUNED.clear()


# ---------------------------------------------------------------- public op
def check_input(x: torch.Tensor, packed: PackedHybrid, bias: torch.Tensor | None) -> None:
    """Raise a one-line ``TypeError``/``ValueError`` for inputs the layer cannot take."""
    check_operands(x, bias, packed.in_features, packed.out_features, packed.dtype, packed.device)


def check_operands(x: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int,
                   dtype: torch.dtype, device: torch.device) -> None:
    """:func:`check_input` for a layer given by its dimensions, weight dtype and device (also what the
    operator's fake implementation checks, where no :class:`PackedHybrid` exists)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"input's last dimension is {tuple(x.shape)[-1:] or '()'}, the layer expects in_features={in_features}")
    if x.dtype != dtype:
        raise TypeError(f"input dtype {x.dtype} does not match the layer's weight dtype {dtype}")
    if x.device != device:
        raise ValueError(f"input is on {x.device}, the layer's weights are on {device}")
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.dtype != dtype):
        raise ValueError(f"bias must be [{out_features}] {dtype}, got {tuple(bias.shape)} {bias.dtype}")


def hybrid_linear(x: torch.Tensor, packed: PackedHybrid, bias: torch.Tensor | None = None,
                  config: KernelConfig | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """``Y = x @ (W*M)^T + bias`` for a packed hybrid layer; ``x [..., in]`` -> ``[..., out]``.

    Runs the Triton kernels on CUDA (or on CPU under ``TRITON_INTERPRET=1`` when ``use_triton`` is
    true) and the torch reference otherwise. ``config`` forces one configuration (tests, benchmarks).
    """
    if config is None and use_triton is None and isinstance(x, torch.Tensor) and x.is_cuda:  # like the last call
        last = packed.__dict__.get("_last_eager")
        if last is not None and _repeats(last, x, bias, torch.cuda.current_device(),
                                         torch.cuda.is_current_stream_capturing()):
            return last[5](x.reshape(-1, packed.in_features), bias).reshape(*last[0][:-1], packed.out_features)
    check_input(x, packed, bias)
    if use_triton is None:
        use_triton = x.is_cuda and kernel_supported(packed)
    if not use_triton:
        from .reference import reference_linear
        return reference_linear(x, packed, bias)
    if not kernel_supported(packed):
        raise ValueError(f"the Triton kernels need 16-bit weights and tile sizes that are multiples of 16 "
                         f"(got {packed.dtype}, {packed.tile_rows}x{packed.tile_cols}); use the reference path")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, packed.out_features)
    if x.is_cuda and x.device.index != torch.cuda.current_device():  # a model spread over several GPUs
        with torch.cuda.device(x.device):
            return _runner(x2, packed, bias, config)(x2, bias).reshape(*lead, packed.out_features)
    run = _runner(x2, packed, bias, config)
    if config is None and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        # the next call with the same input shape, dtype, device and bias skips the checks and look-ups above
        packed.__dict__["_last_eager"] = (x.shape, bias, _TUNED.gen, x.dtype, x.device.index, run)
    return run(x2, bias).reshape(*lead, packed.out_features)


def _repeats(last: tuple, x: torch.Tensor, bias, current_device: int, capturing: bool) -> bool:
    """Whether an eager call may reuse the layer's last eager launch ``last`` (input shape, bias, tuning
    generation, dtype, device index, runner) without the checks and look-ups: same input shape and dtype, the
    same bias object, on the current device, no tuning since, and not being captured into a CUDA graph."""
    return (x.shape == last[0] and bias is last[1] and last[2] == _TUNED.gen and x.dtype is last[3]
            and x.get_device() == last[4] == current_device and not capturing)


_NOTED: set = set()


def _note_portable_path(device: torch.device) -> None:
    """Say once per device when the sparse-tensor-core kernels cannot serve it (the Triton kernels do); called
    when a layer's launch is prepared, not per call."""
    if device in _NOTED:
        return
    _NOTED.add(device)
    reason = _cm.unavailable_reason(device) if MMA_CANDIDATES and not interpreting() else None
    if reason is not None:
        import warnings
        warnings.warn(f"tilesparse: hybrid layers on {device} run the portable Triton kernels, not the "
                      f"sparse-tensor-core ones: {reason}", RuntimeWarning, stacklevel=3)


_MAX_RUNNERS = 64  # per layer (token counts x bias x forced configurations); the cache restarts beyond


def _runner(x2: torch.Tensor, packed: PackedHybrid, bias, config: KernelConfig | None):
    """The layer's launch for these many tokens, ``fn(x2, bias) -> out``: chosen (tuned, cached, or the
    heuristic; eager calls and calls captured into a CUDA graph have their own choice, see
    :func:`choose_config`), fitted and prepared once per (tokens, bias or not, forced config, eager or
    captured), then kept on ``packed`` until the tuning table changes -- so that an eager call costs little
    more host time than the launch itself. A heuristic choice made during CUDA-graph capture (tuning cannot
    run there) is not kept."""
    M, has_bias = x2.shape[0], bias is not None
    capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (M, has_bias, config, not capturing)
    run = _runner_cache(packed).get(key)
    if run is not None:
        return run
    if x2.is_cuda:
        _note_portable_path(x2.device)
    cfg = config if config is not None else choose_config(x2, packed, bias, eager=not capturing)
    cfg = _fit(cfg, packed) or heuristic_config(M, packed)
    run = _prepared_runner(packed, cfg, M, has_bias)
    if config is not None or tune_key(M, packed, has_bias) in _TUNED or not capturing:
        cache = _runner_cache(packed)  # (anew if tuning just ran)
        if len(cache) >= _MAX_RUNNERS:
            cache.clear()
        cache[key] = run
    return run


def _runner_cache(packed: PackedHybrid) -> dict:
    """The layer's prepared launches for the current tuning generation (emptied when it moved)."""
    gen, cache = packed.__dict__.get("_runners", (None, None))
    if gen != _TUNED.gen:
        cache = {}
        packed.__dict__["_runners"] = (_TUNED.gen, cache)
    return cache


def _prepared_runner(packed: PackedHybrid, cfg: KernelConfig, M: int, has_bias: bool):
    """``fn(x2, bias) -> out`` running fitted ``cfg`` on ``M`` tokens: the mma kernels' launch and the dense
    layer's weight view bound once; the other paths through :func:`run_config`."""
    N = packed.out_features
    if cfg.path == "dense":
        w = packed.dense_view()
        return lambda x2, bias: torch.nn.functional.linear(x2, w, bias)
    if cfg.path in ("mma", "gemm"):
        launch = (prepare_mma if cfg.path == "mma" else prepare_gemm)(packed, cfg, M, has_bias)

        def run(x2, bias):
            out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
            launch(x2, out, bias)
            return out
        return run
    if cfg.path == "columns":
        return prepare_columns(packed, cfg)
    return lambda x2, bias: run_config(x2, packed, bias, cfg)
