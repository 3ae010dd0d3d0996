"""Packed hybrid (dense / 2:4 / all-zero tiles) format of one linear weight: pack, unpack, byte count.

Pure tensor math: no kernels, no files. The layout is designed for the GPU kernels
(:mod:`tilesparse.kernels.triton_stream`, :mod:`tilesparse.kernels.cuda_mma`: a program streams rows of one
tile-row along ``in``):

Per tile-row ``r`` (``tile_rows`` output rows, fewer in a partial edge tile-row), the tiles are split by
kind and kept in ascending column order:

* **2:4 tiles** -- their columns are concatenated into one "sparse K-space" of ``sp_len[r]`` positions
  (a partial edge tile, if 2:4, is last). Stored row-major as

  - ``sp_vals``: the two kept values of every group of 4, in order (``sp_len/2`` values per row,
    row stride padded to a multiple of 8 elements = 16 bytes);
  - ``sp_meta``: 4 bits per group, ``p0 | p1 << 2`` with ``p0 < p1`` the kept positions (0..3);
    group ``2b`` in the low nibble of byte ``b``, group ``2b+1`` in the high nibble
    (``sp_len/8`` bytes per row, row stride padded to a multiple of 16 bytes).

  For a layer whose tiles are all 2:4, ``sp_vals`` is the usual ``[out, in/2]`` compressed matrix.
* **dense tiles** -- likewise concatenated into ``dn_len[r]`` positions, stored row-major in ``dn_vals``
  (row stride padded to 8 elements). For an all-dense layer ``dn_vals`` *is* ``W`` (row-major), so
  a dense layer costs nothing extra and can be handed to cuBLAS as it is.
* **all-zero tiles** -- stored nowhere (only in the tile map).

Column indices of the tiles of each kind (CSR: ``sp_ptr``/``sp_cols``, ``dn_ptr``/``dn_cols``) map
positions of the concatenated K-spaces back to input columns. ``row_info[r]`` holds the per-tile-row
lengths, block offsets and strides the kernels need (derived; recomputed on load).

Bytes: a 2:4 tile costs ``0.5 + 0.0625 = 0.5625`` of its dense bytes in 16-bit types.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..masks.nm import PATTERNS, check_2to4, ids_from_mask
from ..masks.tiles import DENSE, SPARSE, ZERO, TileGrid, classify_tiles

FORMAT_VERSION = 1
VAL_ALIGN = 8  # elements (16 bytes for 16-bit types)
META_ALIGN = 16  # bytes
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# row_info columns
RI_SP_LEN, RI_SP_OFF, RI_SP_STRIDE, RI_MT_OFF, RI_MT_STRIDE, RI_DN_LEN, RI_DN_OFF, RI_DN_STRIDE = range(8)
ROW_INFO_COLS = 8

# kept positions (p0, p1) of each of the 6 pattern ids of masks.nm.PATTERNS
_PAT_POS = torch.stack([torch.nonzero(p).flatten() for p in PATTERNS])  # [6, 2]


def pack_nibbles(values: torch.Tensor, stride: int) -> torch.Tensor:
    """4-bit values ``[rows, n]`` (integers 0..15) -> bytes ``[rows, stride]``: value ``2i`` in the low nibble
    of byte ``i``, ``2i + 1`` in the high one, zero padded (the 2:4 metadata's layout, and the 4-bit codes')."""
    v = values.to(torch.int32)
    if v.shape[1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    b = (v[:, 0::2] | (v[:, 1::2] << 4)).to(torch.uint8)
    return torch.nn.functional.pad(b, (0, stride - b.shape[1]))


def unpack_nibbles(b: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes ``[rows, stride]`` -> values ``[rows, n]`` (int64)."""
    b = b.to(torch.int64)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, :n]


class _TiledLayer:
    """What the packed layouts (16-bit :class:`PackedHybrid`, 4-bit ``PackedHybridQ4``) share: the tile grid,
    the weight's shape and the stored tensors (``STORED``)."""

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.out_features, self.in_features, self.tile_rows, self.tile_cols)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the layer (what is saved to disk)."""
        return {name: getattr(self, name) for name in self.STORED}


def kept_positions(sp_meta: torch.Tensor, mt_off: int, mt_stride: int, rh: int, sp_len: int) -> torch.Tensor:
    """The kept positions ``(p0, p1)`` of every 2:4 group of a tile-row (``rh`` rows, ``sp_len`` sparse K-space
    positions, metadata at ``mt_off`` with row stride ``mt_stride`` in ``sp_meta``): int64 ``[rh, sp_len / 4,
    2]``; corrupt metadata raises."""
    nib = unpack_nibbles(sp_meta[mt_off:mt_off + rh * mt_stride].view(rh, mt_stride), sp_len // 4)
    pos = torch.stack([nib & 3, nib >> 2], dim=-1)
    if bool((pos[..., 0] >= pos[..., 1]).any()):
        raise ValueError("packed layer: corrupt 2:4 metadata (positions not increasing)")
    return pos


@dataclass
class PackedHybrid(_TiledLayer):
    """One linear weight ``W[out, in]`` in the packed hybrid format (see module docstring).

    Stored tensors (saved to disk): ``tile_kinds``, ``sp_ptr``, ``sp_cols``, ``dn_ptr``, ``dn_cols``,
    ``sp_vals``, ``sp_meta``, ``dn_vals``. Derived (rebuilt by :meth:`rebuild_layout`): ``row_info``
    and ``tile_slot`` (index of each tile inside its tile-row's list of its kind, -1 for zero tiles).
    """

    out_features: int
    in_features: int
    tile_rows: int
    tile_cols: int
    tile_kinds: torch.Tensor  # int8 [R, C]
    sp_ptr: torch.Tensor  # int32 [R+1]
    sp_cols: torch.Tensor  # int32 [n_sparse]
    dn_ptr: torch.Tensor  # int32 [R+1]
    dn_cols: torch.Tensor  # int32 [n_dense]
    sp_vals: torch.Tensor  # dtype [*]
    sp_meta: torch.Tensor  # uint8 [*]
    dn_vals: torch.Tensor  # dtype [*]
    row_info: torch.Tensor = field(default=None)  # int64 [R, 8] (derived)
    tile_slot: torch.Tensor = field(default=None)  # int32 [R, C] (derived)

    STORED = ("tile_kinds", "sp_ptr", "sp_cols", "dn_ptr", "dn_cols", "sp_vals", "sp_meta", "dn_vals")

    def __post_init__(self) -> None:
        self.rebuild_layout()

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.dn_vals.dtype

    @property
    def device(self) -> torch.device:
        return self.dn_vals.device

    def kind_counts(self) -> dict[str, int]:
        """Number of 2:4, dense and all-zero tiles."""
        k = self.tile_kinds
        return {"sparse": int((k == SPARSE).sum()), "dense": int((k == DENSE).sum()), "zero": int((k == ZERO).sum())}

    def sparse_fraction(self) -> float:
        """Fraction of the weights (partial tiles by real size) that lie in 2:4 tiles (cached)."""
        return self._sparse_fraction

    def is_plain_dense(self) -> bool:
        """True when every tile is dense and ``dn_vals`` is exactly ``W`` row-major (no padding; cached)."""
        return self._plain_dense

    def dense_view(self) -> torch.Tensor:
        """``W`` as a ``[out, in]`` view of ``dn_vals`` (only for :meth:`is_plain_dense` layers)."""
        if not self.is_plain_dense():
            raise ValueError("dense_view() needs a layer whose tiles are all dense")
        return self.dn_vals.view(self.out_features, self.in_features)

    # ------------------------------------------------------------------ bytes
    def nbytes(self, include_derived: bool = True) -> int:
        """Bytes of the packed layer (values, metadata, indices, tile map; derived tables if asked)."""
        n = sum(t.numel() * t.element_size() for t in self.stored_tensors().values())
        if include_derived:
            n += self.row_info.numel() * self.row_info.element_size()
            n += self.tile_slot.numel() * self.tile_slot.element_size()
        return n

    def dense_nbytes(self) -> int:
        """Bytes of the same weight stored dense in :attr:`dtype`."""
        return self.out_features * self.in_features * self.dn_vals.element_size()

    # ------------------------------------------------------------------ layout
    def rebuild_layout(self) -> None:
        """Recompute ``row_info`` and ``tile_slot`` from the tile map (checks the stored tensors' sizes)."""
        kinds = self.tile_kinds.cpu()
        info, slot, sizes = _layout(kinds, self.grid)
        for name, need in sizes.items():
            have = getattr(self, name).numel()
            if have != need:
                raise ValueError(f"packed layer: {name} holds {have} elements, layout needs {need}")
        numel = self.grid.tile_numel()
        self._sparse_fraction = float(numel[kinds == SPARSE].sum()) / self.grid.numel
        self._plain_dense = bool((kinds == DENSE).all()) and sizes["dn_vals"] == self.grid.numel
        self.row_info = info.to(self.dn_vals.device)
        self.tile_slot = slot.to(self.dn_vals.device)
        for k in ("_mma_steps", "_mma_v9", "_runners", "_column_layout"):  # kernel descriptors (cuda_mma.step_table /
            self.__dict__.pop(k, None)  # item_table, prepared launches, tilelang_columns.column_layout) are per layout

    def clone(self) -> "PackedHybrid":
        """A copy with its own storage."""
        return PackedHybrid(**{f.name: getattr(self, f.name).clone() if isinstance(getattr(self, f.name), torch.Tensor)
                               else getattr(self, f.name) for f in fields(self)})

    def to(self, device=None, dtype=None) -> "PackedHybrid":
        """Copy to another device and/or value dtype (metadata keeps its integer types)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if f.name in ("sp_vals", "dn_vals") and dtype is not None:
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device=device)
            kw[f.name] = v
        return PackedHybrid(**kw)

    def unpack(self) -> torch.Tensor:
        """Exact masked weight ``W * M`` ``[out, in]`` in :attr:`dtype` (see :func:`unpack`)."""
        return unpack(self)


def _layout(kinds: torch.Tensor, grid: TileGrid):
    """Per tile-row lengths/offsets/strides (row_info), per-tile slots and the stored tensor sizes."""
    R, C = grid.shape
    k = kinds.to(torch.int64)
    bad = (k != SPARSE) & (k != DENSE) & (k != ZERO)
    if bool(bad.any()):
        r, c = bad.nonzero()[0].tolist()
        raise ValueError(f"tile ({r}, {c}) has unknown kind {int(k[r, c])}")
    rows, cols = grid.row_sizes(), grid.col_sizes()
    is_sp, is_dn = k == SPARSE, k == DENSE
    # a tile's slot: its index among the tiles of its kind in its tile-row
    slot = torch.where(is_sp, is_sp.cumsum(1) - 1, torch.where(is_dn, is_dn.cumsum(1) - 1, -1)).to(torch.int32)
    sp_len, dn_len = (is_sp * cols).sum(1), (is_dn * cols).sum(1)

    def round_up(x: torch.Tensor, a: int) -> torch.Tensor:
        return (x + a - 1) // a * a

    def offsets(stride: torch.Tensor) -> torch.Tensor:  # where each tile-row starts: exclusive prefix sum
        return torch.cumsum(rows * stride, 0) - rows * stride

    sp_stride = round_up(sp_len // 2, VAL_ALIGN)
    mt_stride = round_up((sp_len + 7) // 8, META_ALIGN)  # (0 for rows without 2:4 tiles)
    dn_stride = round_up(dn_len, VAL_ALIGN)
    info = torch.stack([sp_len, offsets(sp_stride), sp_stride, offsets(mt_stride), mt_stride, dn_len,
                        offsets(dn_stride), dn_stride], dim=1)
    sizes = {"sp_vals": int((rows * sp_stride).sum()), "sp_meta": int((rows * mt_stride).sum()),
             "dn_vals": int((rows * dn_stride).sum()), "sp_cols": int(is_sp.sum()), "dn_cols": int(is_dn.sum()),
             "sp_ptr": R + 1, "dn_ptr": R + 1, "tile_kinds": R * C}
    return info, slot, sizes


def _grid_for(weight: torch.Tensor, tile) -> TileGrid:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype {weight.dtype} not supported (use one of {SUPPORTED_DTYPES})")
    if len(tuple(tile)) != 2:
        raise ValueError(f"tile must be (tile_rows, tile_cols), got {tile}")
    return TileGrid(weight.shape[0], weight.shape[1], int(tile[0]), int(tile[1]))


def pack(weight: torch.Tensor, mask: torch.Tensor, tile: tuple[int, int] = (128, 128)) -> PackedHybrid:
    """Pack ``weight * mask`` given a boolean keep-mask whose every tile is dense, exactly 2:4 or empty.

    The tile kinds are read off the mask (:func:`tilesparse.masks.tiles.classify_tiles`); a tile that
    is none of the three raises ``ValueError``.
    """
    grid = _grid_for(weight, tile)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device).bool()
    kinds = classify_tiles(mask, grid)
    return pack_from_kinds(weight, kinds, mask, tile)


def pack_from_kinds(
    weight: torch.Tensor, tile_kinds: torch.Tensor, mask24: torch.Tensor | None, tile: tuple[int, int] = (128, 128)
) -> PackedHybrid:
    """Pack from an explicit tile map (``SPARSE``/``DENSE``/``ZERO`` per tile) and a 2:4 mask.

    ``mask24`` ``[out, in]`` is read inside 2:4 tiles only and must be exactly 2:4 there
    (``NotTwoFourError`` otherwise); it may be ``None`` when no tile is 2:4.
    """
    grid = _grid_for(weight, tile)
    kinds = tile_kinds.detach().to("cpu", torch.int8)
    if tuple(kinds.shape) != grid.shape:
        raise ValueError(f"tile map has shape {tuple(kinds.shape)}, grid is {grid.shape}")
    bad = ~((kinds == SPARSE) | (kinds == DENSE) | (kinds == ZERO))
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        raise ValueError(f"tile ({r}, {c}) has unknown kind {int(kinds[r, c])}")
    has_sparse = bool((kinds == SPARSE).any())
    if has_sparse:
        if mask24 is None:
            raise ValueError("a 2:4 mask is needed: the tile map has 2:4 tiles")
        if tuple(mask24.shape) != tuple(weight.shape):
            raise ValueError(f"2:4 mask shape {tuple(mask24.shape)} does not match weight {tuple(weight.shape)}")
        if grid.in_features % 4:
            raise ValueError(f"in_features={grid.in_features} is not a multiple of 4: no tile can be 2:4")
    info, slot, _ = _layout(kinds, grid)
    w = weight.detach()
    dev = w.device
    R, C = grid.shape
    TR, TC = grid.tile_rows, grid.tile_cols
    sp_vals, sp_meta, dn_vals, sp_cols, dn_cols = [], [], [], [], []
    sp_ptr, dn_ptr = [0], [0]
    for r in range(R):
        r0, r1 = r * TR, min((r + 1) * TR, grid.out_features)
        rh = r1 - r0
        kr = kinds[r]
        sc = (kr == SPARSE).nonzero().flatten().tolist()
        dc = (kr == DENSE).nonzero().flatten().tolist()
        sp_cols += sc
        dn_cols += dc
        sp_ptr.append(len(sp_cols))
        dn_ptr.append(len(dn_cols))
        sp_len, _, sp_stride, _, mt_stride, dn_len, _, dn_stride = info[r].tolist()
        if dc:
            idx = torch.cat([torch.arange(c * TC, min((c + 1) * TC, grid.in_features)) for c in dc]).to(dev)
            block = w[r0:r1].index_select(1, idx)
            dn_vals.append(torch.nn.functional.pad(block, (0, dn_stride - dn_len)).reshape(-1))
        if sc:
            idx = torch.cat([torch.arange(c * TC, min((c + 1) * TC, grid.in_features)) for c in sc]).to(dev)
            block = w[r0:r1].index_select(1, idx)  # [rh, sp_len]
            m = mask24[r0:r1].to(dev).bool().index_select(1, idx)
            if not _is24(m):  # locate the first offending tile for a precise message
                for c in sc:
                    check_2to4(mask24[r0:r1, c * TC:min((c + 1) * TC, grid.in_features)],
                               what=f"2:4 tile ({r}, {c})")
            ids = ids_from_mask(m).long()  # [rh, G]
            pos = _PAT_POS.to(dev)[ids]  # [rh, G, 2]
            g = torch.arange(sp_len // 4, device=dev) * 4
            vals = torch.gather(block, 1, (g[None, :, None] + pos).reshape(rh, -1))  # [rh, sp_len/2]
            sp_vals.append(torch.nn.functional.pad(vals, (0, sp_stride - sp_len // 2)).reshape(-1))
            sp_meta.append(pack_nibbles(pos[..., 0] | (pos[..., 1] << 2), mt_stride).reshape(-1))
    dt = w.dtype

    def cat(xs, dtype):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype, device=dev)

    return PackedHybrid(
        out_features=grid.out_features, in_features=grid.in_features, tile_rows=TR, tile_cols=TC,
        tile_kinds=kinds.to(dev),
        sp_ptr=torch.tensor(sp_ptr, dtype=torch.int32, device=dev),
        sp_cols=torch.tensor(sp_cols, dtype=torch.int32, device=dev),
        dn_ptr=torch.tensor(dn_ptr, dtype=torch.int32, device=dev),
        dn_cols=torch.tensor(dn_cols, dtype=torch.int32, device=dev),
        sp_vals=cat(sp_vals, dt).contiguous(), sp_meta=cat(sp_meta, torch.uint8).contiguous(),
        dn_vals=cat(dn_vals, dt).contiguous(),
    )


def _is24(m: torch.Tensor) -> bool:
    if m.shape[-1] % 4:
        return False
    return bool((m.bool().reshape(m.shape[0], -1, 4).sum(-1) == 2).all())


def _kind_columns(p: PackedHybrid, r: int, ptr: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    TC, K = p.tile_cols, p.in_features
    cs = cols[int(ptr[r]):int(ptr[r + 1])].tolist()
    if not cs:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(c * TC, min((c + 1) * TC, K)) for c in cs])


def unpack(p: PackedHybrid) -> torch.Tensor:
    """Exact inverse of :func:`pack`: the masked weight ``W * M`` ``[out, in]`` (zeros where pruned)."""
    dev = p.dn_vals.device
    W = torch.zeros(p.out_features, p.in_features, dtype=p.dtype, device=dev)
    info = p.row_info.cpu()
    sp_ptr, dn_ptr = p.sp_ptr.cpu(), p.dn_ptr.cpu()
    sp_cols, dn_cols = p.sp_cols.cpu(), p.dn_cols.cpu()
    rows = p.grid.row_sizes().tolist()
    for r in range(len(rows)):
        r0, rh = r * p.tile_rows, rows[r]
        sp_len, sp_off, sp_stride, mt_off, mt_stride, dn_len, dn_off, dn_stride = info[r].tolist()
        if dn_len:
            block = p.dn_vals[dn_off:dn_off + rh * dn_stride].view(rh, dn_stride)[:, :dn_len]
            W[r0:r0 + rh, _kind_columns(p, r, dn_ptr, dn_cols).to(dev)] = block
        if sp_len:
            G = sp_len // 4
            vals = p.sp_vals[sp_off:sp_off + rh * sp_stride].view(rh, sp_stride)[:, :sp_len // 2]
            pos = kept_positions(p.sp_meta, mt_off, mt_stride, rh, sp_len)  # [rh, G, 2]
            full = torch.zeros(rh, sp_len, dtype=p.dtype, device=dev)
            g = torch.arange(G, device=dev) * 4
            full.scatter_(1, (g[None, :, None] + pos).reshape(rh, -1), vals)
            W[r0:r0 + rh, _kind_columns(p, r, sp_ptr, sp_cols).to(dev)] = full
    return W


def hybrid_bytes(out_features: int, in_features: int, sparse_fraction: float, element_size: int = 2) -> float:
    """Ideal packed bytes of a layer with the given fraction of weights in 2:4 tiles (no padding)."""
    n = out_features * in_features
    return n * element_size * (1 - sparse_fraction) + n * sparse_fraction * (element_size / 2 + 1 / 8)


def bytes_bound_speedup(sparse_fraction: float, element_size: int = 2) -> float:
    """Upper bound on a memory-bound kernel's speedup over dense: dense bytes / packed bytes."""
    saved = sparse_fraction * (0.5 - 1 / (8 * element_size))
    return 1.0 / (1.0 - saved)
