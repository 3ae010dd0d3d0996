"""Column-shared hybrid layers on Hopper's sparse tensor cores, through TileLang (``T.gemm_sp``, ``wgmma.sp``).

A layer packed from a ``tile_map="columns"`` mask has every tile-column either 2:4 in all its tile-rows or dense
in all of them. Its packed arrays (:mod:`.format`) are then two plain matrices: ``sp_vals`` is the compressed
``[out, ks / 2]`` matrix of its ``ks`` 2:4 columns, ``sp_meta`` read as int16 ``[out, ks / 16]`` is exactly the
metadata ``T.gemm_sp`` takes for 16-bit operands (four groups per int16, ``p0 | p1 << 2`` each, on a
little-endian machine), and ``dn_vals`` is the ``[out, kd]`` matrix of its dense columns. So the layer runs as two
GEMMs over views of the stored tensors, with no copy:

1. ``y = x[:, S] @ W_S^T`` by ``T.gemm_sp`` (:func:`sparse_func`; or, split over K, fp32 partials that step 2
   starts from), and
2. ``y += x[:, D] @ W_D^T``, by a TileLang GEMM (:func:`dense_func`) or by a gather of x's dense columns and
   cuBLAS ``addmm``.

Where TileLang runs both, they are one TileLang program (:func:`pair_func`), so that a layer costs one host call.

Neither kernel gathers x: each step reads x's columns of one or two tile-columns, whose indices come from a
small table (:attr:`ColumnLayout.sp_tc`, :attr:`ColumnLayout.dn_tc`). Every dimension is a run-time value
(``T.dynamic``), so one compiled kernel per configuration serves every layer and token count.

TileLang is optional (``pip install tilesparse[tilelang]``); it compiles on first use with ``nvcc`` (or NVRTC),
and its kernels are cached on disk. The dispatcher (:mod:`.ops`, path ``"columns"``) offers this route on
compute capability 9.0 for layers :func:`column_layout` accepts.
"""

# (no "from __future__ import annotations": TileLang evaluates the kernels' annotations at definition)
import sys
from dataclasses import dataclass

import torch

from .format import DENSE, SPARSE, PackedHybrid, kept_positions

TILE_WIDTHS = (128,)  # tile widths the kernels take (a step reads one or two tile-columns of x); checked on an H200
_KERNELS: dict = {}
_FAILED: dict = {}


def unavailable_reason(device=None) -> str | None:
    """``None`` when the TileLang route can run on ``device`` (a CUDA device of compute capability 9.0 with
    TileLang importable), else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if device is not None and torch.device(device).type != "cuda":
        return f"{torch.device(device)} is not a CUDA device"
    cc = torch.cuda.get_device_capability(device)
    if cc != (9, 0):
        return f"compute capability {cc[0]}.{cc[1]} (the TileLang route is built and checked for 9.0 only)"
    try:
        import tilelang  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the route is unavailable
        return f"TileLang does not import ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
    return None


def available(device=None) -> bool:
    """True when :func:`unavailable_reason` finds nothing missing."""
    return unavailable_reason(device) is None


@dataclass
class ColumnLayout:
    """A column-shared layer as the two GEMMs see it: views of the layer's stored tensors and the tile-column
    tables (int32, on the layer's device)."""

    ws: torch.Tensor  # [out, ks / 2] kept values of the 2:4 columns
    e16: torch.Tensor  # int16 [out, ks / 16] their metadata (TileLang's layout)
    wd: torch.Tensor  # [out, kd] the dense columns
    sp_tc: torch.Tensor  # int32 [n_sp] tile-column of each 2:4 step, ascending
    dn_tc: torch.Tensor  # int32 [n_dn] tile-column of each dense step, ascending
    dn_idx: torch.Tensor  # int64 [kd] the dense input columns (for the gather + cuBLAS variant)
    tile_width: int

    @property
    def n_sp(self) -> int:
        return self.sp_tc.numel()

    @property
    def n_dn(self) -> int:
        return self.dn_tc.numel()


def column_split(kinds: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """``(2:4 tile-columns, dense tile-columns)`` of a tile map ``[R, C]`` whose every column is all 2:4 or all
    dense, with at least one 2:4 column; ``None`` for any other map (zero tiles, mixed columns)."""
    if kinds.numel() == 0 or not bool((kinds == kinds[:1]).all()):
        return None
    row = kinds[0].tolist()
    if any(k not in (SPARSE, DENSE) for k in row) or SPARSE not in row:
        return None
    return [c for c, k in enumerate(row) if k == SPARSE], [c for c, k in enumerate(row) if k == DENSE]


def column_reason(packed: PackedHybrid) -> str | None:
    """``None`` when :func:`column_layout` can view ``packed`` as a column-shared layer, else why not."""
    if packed.dtype not in (torch.bfloat16, torch.float16):
        return f"weights are {packed.dtype}, not 16-bit"
    if packed.tile_cols not in TILE_WIDTHS or packed.in_features % packed.tile_cols:
        return f"tile width {packed.tile_cols} with {packed.in_features} input columns (needs {TILE_WIDTHS}, no partial tile)"
    if packed.out_features % 64:
        return f"{packed.out_features} output rows (a multiple of 64 needed)"
    if sys.byteorder != "little":
        return "the metadata view needs a little-endian machine"
    if column_split(packed.tile_kinds) is None:
        return "the tile map is not column-shared (a tile-column mixes kinds, or has zero tiles)"
    return None


def column_layout(packed: PackedHybrid) -> ColumnLayout | None:
    """The layer's :class:`ColumnLayout` (cached on ``packed``; dropped by its ``rebuild_layout``), or ``None``
    when :func:`column_reason` says it is not a column-shared layer the kernels take."""
    cached = packed.__dict__.get("_column_layout", False)
    if cached is not False:
        return cached
    layout = None
    if column_reason(packed) is None:
        sp, dn = column_split(packed.tile_kinds)
        N, tw = packed.out_features, packed.tile_cols
        ks, kd = len(sp) * tw, len(dn) * tw
        dev = packed.device
        # full tiles, equal K-spaces in every tile-row: the per-tile-row blocks are one row-major matrix each
        ws = packed.sp_vals[: N * ks // 2].view(N, ks // 2)
        e16 = packed.sp_meta[: N * ks // 8].view(N, ks // 8).view(torch.int16)
        wd = packed.dn_vals[: N * kd].view(N, kd)
        dn_idx = (torch.tensor(dn, dtype=torch.int64)[:, None] * tw + torch.arange(tw)[None, :]).reshape(-1)
        layout = ColumnLayout(ws=ws, e16=e16, wd=wd, sp_tc=torch.tensor(sp, dtype=torch.int32, device=dev),
                              dn_tc=torch.tensor(dn, dtype=torch.int32, device=dev), dn_idx=dn_idx.to(dev),
                              tile_width=tw)
    packed.__dict__["_column_layout"] = layout
    return layout


def reference_columns(x2: torch.Tensor, layout: ColumnLayout) -> torch.Tensor:
    """The two GEMMs in torch (float32 accumulation): what the kernels compute, from the same views. For tests of
    the layout on any device."""
    N = layout.ws.shape[0]
    tw = layout.tile_width
    ks = layout.n_sp * tw
    pos = kept_positions(layout.e16.view(torch.uint8).reshape(-1), 0, ks // 8, N, ks).to(x2.device)  # [N, G, 2]
    w_sp = torch.zeros(N, ks // 4, 4, dtype=torch.float32, device=x2.device)
    w_sp.scatter_(2, pos, layout.ws.float().view(N, ks // 4, 2))
    sp_idx = (layout.sp_tc.long()[:, None] * tw + torch.arange(tw, device=x2.device)[None, :]).reshape(-1)
    y = x2.float()[:, sp_idx] @ w_sp.reshape(N, ks).t()
    if layout.n_dn:
        y += x2.float()[:, layout.dn_idx] @ layout.wd.float().t()
    return y.to(x2.dtype)


# ---------------------------------------------------------------- kernels
def _launch_hints(T, blocks_per_sm: int, pdl: bool):
    """The 2:4 kernels' launch hints as a TileLang macro: ``blocks_per_sm`` above 1 asks ``nvcc`` for that many
    resident blocks and drops ``setmaxnreg``; ``pdl`` lets the dependent dense kernel start at once."""

    @T.macro
    def hints():
        if blocks_per_sm > 1:
            T.annotate_min_blocks_per_sm(blocks_per_sm)
            T.no_set_max_nreg()
        if pdl:
            T.pdl_trigger()

    return hints


def _sparse_kernel(T, tw: int, rows: int, toks: int, tpk: int, stages: int, threads: int, dtype: str, square: bool,
                   splits: int = 1, blocks_per_sm: int = 1, pdl: bool = False):
    """The 2:4 kernel of :func:`sparse_func` as a TileLang macro ``(Ws, E, TC, X, out)``: ``out`` is ``Y`` or,
    with ``splits`` above 1, the fp32 partials (:func:`sparse_split_func`); its sizes come from the buffers."""
    from tilelang.language import GemmWarpPolicy as P

    pol = P.Square if square else P.FullRow
    launch_hints = _launch_hints(T, blocks_per_sm, pdl)

    @T.macro
    def plain(Ws, E, TC, X, Y):
        m, n, nsteps = X.shape[0], Ws.shape[0], TC.shape[0]
        with T.Kernel(T.ceildiv(m, toks), T.ceildiv(n, rows), threads=threads) as (bx, by):
            launch_hints()
            # one buffer set per tile-column of a step: each x copy is then a whole-buffer (TMA) copy that the
            # producer issues with the weights' copies (written out: the builder turns Python loops into TIR loops)
            A0 = T.alloc_shared((rows, tw // 2), dtype)
            E0 = T.alloc_shared((rows, tw // 16), "int16")
            B0 = T.alloc_shared((toks, tw), dtype)
            A1 = T.alloc_shared((rows, tw // 2), dtype) if tpk == 2 else None
            E1 = T.alloc_shared((rows, tw // 16), "int16") if tpk == 2 else None
            B1 = T.alloc_shared((toks, tw), dtype) if tpk == 2 else None
            C_l = T.alloc_fragment((rows, toks), "float32")
            T.clear(C_l)
            for s in T.Pipelined(nsteps // tpk, num_stages=stages):
                T.copy(Ws[by * rows, s * tpk * (tw // 2)], A0)
                T.copy(E[by * rows, s * tpk * (tw // 16)], E0)
                T.copy(X[bx * toks, TC[s * tpk] * tw], B0)
                if tpk == 2:
                    T.copy(Ws[by * rows, (s * 2 + 1) * (tw // 2)], A1)
                    T.copy(E[by * rows, (s * 2 + 1) * (tw // 16)], E1)
                    T.copy(X[bx * toks, TC[s * 2 + 1] * tw], B1)
                T.gemm_sp(A0, E0, B0, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
                if tpk == 2:
                    T.gemm_sp(A1, E1, B1, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
            for i, j in T.Parallel(rows, toks):
                if bx * toks + j < m:
                    Y[bx * toks + j, by * rows + i] = C_l[i, j]

    @T.macro
    def split(Ws, E, TC, X, Part):
        m, n, nsteps = X.shape[0], Ws.shape[0], TC.shape[0]
        with T.Kernel(T.ceildiv(m, toks), T.ceildiv(n, rows), splits, threads=threads) as (bx, by, bz):
            launch_hints()
            A0 = T.alloc_shared((rows, tw // 2), dtype)
            E0 = T.alloc_shared((rows, tw // 16), "int16")
            B0 = T.alloc_shared((toks, tw), dtype)
            C_l = T.alloc_fragment((rows, toks), "float32")
            T.clear(C_l)
            for s in T.Pipelined(T.ceildiv(nsteps, splits), num_stages=stages):
                T.copy(Ws[by * rows, (bz * T.ceildiv(nsteps, splits) + s) * (tw // 2)], A0)
                T.copy(E[by * rows, (bz * T.ceildiv(nsteps, splits) + s) * (tw // 16)], E0)
                T.copy(X[bx * toks, TC[T.min(bz * T.ceildiv(nsteps, splits) + s, nsteps - 1)] * tw], B0)
                T.gemm_sp(A0, E0, B0, C_l, transpose_A=False, transpose_E=False, transpose_B=True, policy=pol)
            for i, j in T.Parallel(rows, toks):
                if bx * toks + j < m:
                    Part[bz, bx * toks + j, by * rows + i] = C_l[i, j]

    return split if splits > 1 else plain


def _dense_kernel(T, tw: int, rows: int, toks: int, stages: int, threads: int, dtype: str, square: bool,
                  splits: int = 1, pdl: bool = False):
    """The dense kernel of :func:`dense_func` as a TileLang macro ``(W, TC, X, Part, Y)`` (``Part`` unused, may be
    ``None``, without split-K); its sizes come from the buffers."""
    from tilelang.language import GemmWarpPolicy as P

    pol = P.Square if square else P.FullRow

    @T.macro
    def steps(W, TC, X, A_s, B_s, C_l, bx, by):
        for s in T.Pipelined(TC.shape[0], num_stages=stages):
            T.copy(W[by * rows, s * tw], A_s)
            T.copy(X[bx * toks, TC[s] * tw], B_s)
            T.gemm(A_s, B_s, C_l, transpose_A=False, transpose_B=True, policy=pol)

    @T.macro
    def store(Y, C_l, bx, by):
        for i, j in T.Parallel(rows, toks):
            if bx * toks + j < Y.shape[0]:
                Y[bx * toks + j, by * rows + i] = C_l[i, j]

    @T.macro
    def add_y(Y, C_l, bx, by):
        for i, j in T.Parallel(rows, toks):
            if bx * toks + j < Y.shape[0]:
                C_l[i, j] += Y[bx * toks + j, by * rows + i]

    @T.macro
    def add_partials(Part, C_l, bx, by, first):
        for z in T.serial(first, splits):
            for i, j in T.Parallel(rows, toks):
                if bx * toks + j < Part.shape[1]:
                    C_l[i, j] += Part[z, bx * toks + j, by * rows + i]

    @T.macro
    def body(W, TC, X, Part, Y):
        m, n = X.shape[0], W.shape[0]
        with T.Kernel(T.ceildiv(m, toks), T.ceildiv(n, rows), threads=threads) as (bx, by):
            A_s = T.alloc_shared((rows, tw), dtype)
            B_s = T.alloc_shared((toks, tw), dtype)
            C_l = T.alloc_fragment((rows, toks), "float32")
            if pdl:
                T.clear(C_l)
                steps(W, TC, X, A_s, B_s, C_l, bx, by)
                T.pdl_sync()
                if splits > 1:
                    add_partials(Part, C_l, bx, by, 0)
                else:
                    add_y(Y, C_l, bx, by)
            else:
                if splits > 1:
                    for i, j in T.Parallel(rows, toks):
                        C_l[i, j] = T.if_then_else(bx * toks + j < m, Part[0, bx * toks + j, by * rows + i], 0)
                    add_partials(Part, C_l, bx, by, 1)
                else:
                    for i, j in T.Parallel(rows, toks):
                        C_l[i, j] = T.if_then_else(bx * toks + j < m, Y[bx * toks + j, by * rows + i], 0)
                steps(W, TC, X, A_s, B_s, C_l, bx, by)
            store(Y, C_l, bx, by)

    return body


def sparse_func(tw: int, rows: int, toks: int, tpk: int, stages: int, threads: int, dtype: str, square: bool,
                splits: int = 1, blocks_per_sm: int = 1, pdl: bool = False):
    """``Y[m, n] = X[:, S] @ A^T``: ``A`` the ``[n, ks]`` 2:4 matrix (values ``[n, ks / 2]``, metadata int16
    ``[n, ks / 16]``), ``S`` the columns of the tile-columns ``TC`` (width ``tw``), ``tpk`` tile-columns per step;
    a block owns ``rows`` weight rows and ``toks`` tokens and writes its tile of ``Y`` transposed. With ``splits``
    above 1 (:func:`sparse_split_func`) the steps are cut into that many ranges and each writes fp32 partials.
    ``blocks_per_sm`` above 1 asks ``nvcc`` for that many resident blocks per SM (``__launch_bounds__``) and leaves
    the warp groups' registers as ``nvcc`` allocates them (no ``setmaxnreg``, which would ask for more than two
    blocks hold). ``pdl``: each block lets the next kernel (the dense one, built with ``pdl``) start at once
    (``cudaTriggerProgrammaticLaunchCompletion``)."""
    if splits > 1:
        return sparse_split_func(tw, rows, toks, stages, threads, dtype, square, splits, blocks_per_sm, pdl)
    import tilelang.language as T

    m, n, k, h, he = T.dynamic("m, n, k, h, he")  # tokens, rows, input columns, kept values and int16 metadata
    # words per row (ks / 2, ks / 16)
    nsteps = T.dynamic("nsteps")  # 2:4 tile-columns (a multiple of tpk)
    body = _sparse_kernel(T, tw, rows, toks, tpk, stages, threads, dtype, square, 1, blocks_per_sm, pdl)

    @T.prim_func
    def main(Ws: T.Tensor((n, h), dtype), E: T.Tensor((n, he), "int16"), TC: T.Tensor((nsteps,), "int32"),
             X: T.Tensor((m, k), dtype), Y: T.Tensor((m, n), dtype)):
        body(Ws, E, TC, X, Y)

    return main


def sparse_split_func(tw: int, rows: int, toks: int, stages: int, threads: int, dtype: str, square: bool,
                      splits: int, blocks_per_sm: int = 1, pdl: bool = False):
    """``P[z, m, n] = X[:, S_z] @ A_z^T`` in fp32: split-K of :func:`sparse_func` (one tile-column per step) over
    ``splits`` blocks per output tile, so that a layer with few row blocks still fills the GPU. Block ``z`` runs
    steps ``z * per .. (z + 1) * per - 1`` (``per = ceil(nsteps / splits)``); a step past the last reads its
    weights out of bounds, which TMA fills with zeros, and its x at the last tile-column (a table index clamped,
    never read past). :func:`dense_func` with the same ``splits`` sums the partials."""
    import tilelang.language as T

    m, n, k, h, he = T.dynamic("m, n, k, h, he")
    nsteps = T.dynamic("nsteps")
    body = _sparse_kernel(T, tw, rows, toks, 1, stages, threads, dtype, square, splits, blocks_per_sm, pdl)

    @T.prim_func
    def main(Ws: T.Tensor((n, h), dtype), E: T.Tensor((n, he), "int16"), TC: T.Tensor((nsteps,), "int32"),
             X: T.Tensor((m, k), dtype), Part: T.Tensor((splits, m, n), "float32")):
        body(Ws, E, TC, X, Part)

    return main


def dense_func(tw: int, rows: int, toks: int, stages: int, threads: int, dtype: str, square: bool,
               splits: int = 1, pdl: bool = False):
    """``Y[m, n] += X[:, D] @ W^T``: ``W`` the ``[n, kd]`` dense columns, ``D`` the columns of the tile-columns
    ``TC``, one tile-column per step; the block's tile of ``Y`` is read first (fp32 accumulation from it). With
    ``splits`` above 1 it starts from the sum of the 2:4 kernel's fp32 partials ``[splits, m, n]`` instead.
    With ``pdl`` (programmatic dependent launch, launched so by TileLang) the block runs its steps from zero while
    the 2:4 kernel may still run, waits for that kernel's grid (``cudaGridDependencySynchronize``) and only then
    adds ``Y`` or the partials: its steps can use the SMs the 2:4 kernel leaves idle."""
    import tilelang.language as T

    m, n, k, kd = T.dynamic("m, n, k, kd")
    nsteps = T.dynamic("nsteps")
    body = _dense_kernel(T, tw, rows, toks, stages, threads, dtype, square, splits, pdl)

    if splits > 1:
        @T.prim_func
        def summed(W: T.Tensor((n, kd), dtype), TC: T.Tensor((nsteps,), "int32"), X: T.Tensor((m, k), dtype),
                   Part: T.Tensor((splits, m, n), "float32"), Y: T.Tensor((m, n), dtype)):
            body(W, TC, X, Part, Y)

        return summed

    @T.prim_func
    def main(W: T.Tensor((n, kd), dtype), TC: T.Tensor((nsteps,), "int32"), X: T.Tensor((m, k), dtype),
             Y: T.Tensor((m, n), dtype)):
        body(W, TC, X, None, Y)

    return main


def pair_func(sparse: tuple, dense: tuple):
    """Both kernels of a layer as one TileLang program (one host call launches them in order on the current
    stream): the 2:4 kernel with :func:`sparse_func`'s arguments ``sparse`` and the dense one with
    :func:`dense_func`'s ``dense`` (equal ``splits``). Arguments ``(Ws, E, TC_sparse, W, TC_dense, X, Y)``, with
    split-K ``(..., X, Part, Y)``: half the launch cost of two programs for an eager caller."""
    import tilelang.language as T

    dtype, splits = sparse[6], sparse[8]
    if dense[7] != splits:
        raise ValueError(f"the 2:4 kernel has {splits} ranges, the dense kernel {dense[7]}")
    m, n, k, h, he, kd = T.dynamic("m, n, k, h, he, kd")
    nsp, ndn = T.dynamic("nsp, ndn")  # 2:4 and dense tile-columns
    sp_body = _sparse_kernel(T, *sparse)
    dn_body = _dense_kernel(T, *dense)

    if splits > 1:
        @T.prim_func
        def pair_summed(Ws: T.Tensor((n, h), dtype), E: T.Tensor((n, he), "int16"), TCs: T.Tensor((nsp,), "int32"),
                        W: T.Tensor((n, kd), dtype), TCd: T.Tensor((ndn,), "int32"), X: T.Tensor((m, k), dtype),
                        Part: T.Tensor((splits, m, n), "float32"), Y: T.Tensor((m, n), dtype)):
            sp_body(Ws, E, TCs, X, Part)
            dn_body(W, TCd, X, Part, Y)

        return pair_summed

    @T.prim_func
    def pair(Ws: T.Tensor((n, h), dtype), E: T.Tensor((n, he), "int16"), TCs: T.Tensor((nsp,), "int32"),
             W: T.Tensor((n, kd), dtype), TCd: T.Tensor((ndn,), "int32"), X: T.Tensor((m, k), dtype),
             Y: T.Tensor((m, n), dtype)):
        sp_body(Ws, E, TCs, X, Y)
        dn_body(W, TCd, X, None, Y)

    return pair


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


_BUILDERS = {"sparse": sparse_func, "dense": dense_func, "pair": pair_func}


def _func(kind: str, params: tuple):
    """The TileLang program ``kind`` ("sparse", "dense" or "pair") with the builder's arguments ``params``."""
    return _BUILDERS[kind](*params)


def kernel(kind: str, params: tuple):
    """The compiled program ``kind`` ("sparse", "dense" or "pair") with ``params`` (the builder's arguments),
    compiled once per process (TileLang keeps its own disk cache); a configuration that failed to compile raises
    again at once."""
    key = (kind, params)
    k = _KERNELS.get(key)
    if k is not None:
        return k
    if key in _FAILED:
        raise RuntimeError(_FAILED[key])
    import tilelang

    try:
        k = tilelang.compile(_func(kind, params), out_idx=None, target="cuda")
    except Exception as e:  # recorded and re-raised as one line
        _FAILED[key] = f"TileLang could not compile the {kind} kernel {params}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise RuntimeError(_FAILED[key]) from e
    _KERNELS[key] = k
    return k


def kernel_params(cfg: "ColumnConfig", tile_width: int, dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """The ``(kind, params)`` of the kernels ``cfg`` launches (the dense one only where TileLang runs it)."""
    dt = _dtype_name(dtype)
    out = [("sparse", (tile_width, cfg.rows, cfg.toks, cfg.tpk, cfg.stages, cfg.threads, dt, cfg.square,
                       cfg.splits, cfg.blocks_per_sm, cfg.pdl))]
    if not cfg.dense_cublas:
        out.append(("dense", (tile_width, cfg.rows, cfg.toks, cfg.stages, cfg.threads, dt, cfg.square,
                              cfg.splits, cfg.pdl)))
    return out


def launch_keys(cfg: "ColumnConfig", tile_width: int, dtype: torch.dtype, has_dense: bool = True) -> list[tuple[str, tuple]]:
    """The ``(kind, params)`` of the programs :func:`prepare` runs for ``cfg`` on a layer with (``has_dense``) or
    without dense columns: both kernels as one program ("pair", one host call per layer) where TileLang runs the
    dense columns, else the 2:4 kernel alone."""
    keys = kernel_params(cfg, tile_width, dtype)
    if len(keys) == 2 and has_dense:
        return [("pair", (keys[0][1], keys[1][1]))]
    return keys[:1]


def precompile(keys, workers: int | None = None) -> int:
    """Compile the kernels ``keys`` (``(kind, params)`` pairs) that this process has not, in parallel
    (``tilelang.par_compile``); returns how many were compiled. A kernel that fails is compiled again, alone, by
    :func:`kernel` when it is asked for (which records the error)."""
    import os

    import tilelang

    todo = [k for k in dict.fromkeys(keys) if k not in _KERNELS and k not in _FAILED]
    if len(todo) < 2:
        return 0
    funcs = [_func(kind, params) for kind, params in todo]
    try:
        built = tilelang.par_compile(funcs, num_workers=workers or min(16, os.cpu_count() or 4), ignore_error=True,
                                     out_idx=None, target="cuda")
    except Exception:  # noqa: BLE001 - fall back to compiling one by one in kernel()
        return 0
    n = 0
    for key, k in zip(todo, built):
        if k is not None:
            _KERNELS[key] = k
            n += 1
    return n


@dataclass(frozen=True)
class ColumnConfig:
    """One way to run the two GEMMs: ``toks`` tokens and ``rows`` weight rows per block, ``tpk`` tile-columns per
    2:4 step, ``stages`` pipeline stages, ``threads`` per block, ``square`` warp policy (else full rows), the
    dense part by TileLang (``dense_cublas`` false) or by a gather of x's dense columns and cuBLAS, the 2:4 steps
    cut into ``splits`` ranges (split-K: fp32 partials that the TileLang dense kernel sums),
    ``blocks_per_sm`` resident 2:4 blocks per SM asked of ``nvcc`` (see :func:`sparse_func`), and ``pdl``: the
    dense kernel launched as a programmatic dependent of the 2:4 one (see :func:`dense_func`)."""

    toks: int
    rows: int
    tpk: int
    stages: int
    threads: int
    square: bool
    dense_cublas: bool
    splits: int = 1
    blocks_per_sm: int = 1
    pdl: bool = False


def prepare(layout: ColumnLayout, cfg: ColumnConfig, dtype: torch.dtype):
    """``fn(x2, out)``: ``out [m, n] = x2 [m, k] @ W^T`` for the layer, its programs (:func:`launch_keys`)
    compiled and bound."""
    (kind, params), = launch_keys(cfg, layout.tile_width, dtype, layout.n_dn > 0)
    prog = kernel(kind, params)
    ws, e16, sp_tc, wd, dn_tc, dn_idx = layout.ws, layout.e16, layout.sp_tc, layout.wd, layout.dn_tc, layout.dn_idx
    if not layout.n_dn:
        return lambda x2, out: prog(ws, e16, sp_tc, x2, out)
    if cfg.dense_cublas:
        wdt = wd.t()

        def run(x2, out):
            prog(ws, e16, sp_tc, x2, out)
            out.addmm_(x2.index_select(1, dn_idx), wdt)
        return run
    if cfg.splits > 1:
        def run_split(x2, out):
            part = torch.empty((cfg.splits, x2.shape[0], out.shape[1]), dtype=torch.float32, device=x2.device)
            prog(ws, e16, sp_tc, wd, dn_tc, x2, part, out)
        return run_split
    return lambda x2, out: prog(ws, e16, sp_tc, wd, dn_tc, x2, out)


def fits(layout: ColumnLayout, cfg: ColumnConfig) -> bool:
    """Whether ``cfg`` can run this layer (two tile-columns per step need an even count of 2:4 tile-columns;
    split-K needs one tile-column per step, at least two steps per range and dense columns for the TileLang
    dense kernel that sums the partials; a dependent launch needs that dense kernel too; shared memory is checked
    when the kernel compiles and launches)."""
    if cfg.splits > 1 and (cfg.tpk != 1 or cfg.dense_cublas or not layout.n_dn or layout.n_sp < 2 * cfg.splits):
        return False
    if cfg.pdl and (cfg.dense_cublas or not layout.n_dn):
        return False
    return layout.n_sp % cfg.tpk == 0 and layout.tile_width * cfg.tpk <= 256


def candidates(M: int) -> list[ColumnConfig]:
    """The configurations the autotuner times for ``M`` tokens. From the route spike's fastest ``T.gemm_sp`` tiles
    at 16, 64, 256 and 2048 tokens (``benchmarks/results/gemm_route_sweep_h200.md``, ``gemm_colshared_h100.md``)
    and the library route's own measurements (``results/columns_h200.md``, ``columns_split_h100.md``): at 16-64
    tokens blocks of 64 rows, one tile-column per step, the dense columns by TileLang, the 2:4 steps in 1 or 2
    ranges (split-K won where 4096 rows make only 64 blocks; 4 ranges won no cell), each with one or two resident
    2:4 blocks per SM, and up to 32 tokens the dense kernel also as a dependent launch (two blocks and the
    dependent launch took 11008x4096 at 16 tokens from 35.4 to 31.7 us; at 64 tokens the dependent launch lost,
    ``columns_parts_occupancy_h100.md``); at 65-256 tokens also
    64-token blocks (they won at 128 tokens on 4096-row layers); above, both dense parts (cuBLAS won at 2048
    tokens). Two tile-columns per step lost every cell on the H200 and asked for more shared memory than the
    H100 gives at 128 x 64: no candidate uses them."""
    if M <= 64:
        t = 16 if M <= 16 else 32 if M <= 32 else 64
        return [ColumnConfig(t, 64, 1, 6, 128, False, False, splits=z, blocks_per_sm=b, pdl=d)
                for z in (1, 2) for b in (1, 2) for d in ((False, True) if M <= 32 else (False,))]
    if M <= 256:
        return ([ColumnConfig(128, 128, 1, 3, 256, True, c) for c in (False, True)]
                + [ColumnConfig(64, 64, 1, 6, 128, False, False)])
    tiles = [(256, 128, 1, 2, 256, True), (128, 256, 1, 2, 256, True)]
    return [ColumnConfig(*t, dense_cublas=c) for t in tiles for c in (False, True)]
