"""Packed hybrid format with 4-bit weights (format version 2): pack, unpack, byte count.

Pure tensor math: no kernels, no files. It keeps the tile structure of :mod:`.format` (tile map, CSR column
lists, the per-tile-row sparse and dense K-spaces, the 2:4 metadata) and replaces the 16-bit values by
4-bit codes of a group-wise quantization (:mod:`tilesparse.quant`):

* ``sp_codes``: the codes of the two kept weights of every 2:4 group, in the order of ``sp_vals`` in
  :mod:`.format`, two codes per byte (value ``2i`` in the low nibble of byte ``i``); ``ceil(sp_len / 4)``
  bytes per row, row stride padded to :data:`CODE_ALIGN` bytes;
* ``sp_meta``: exactly as in :mod:`.format` (``p0 | p1 << 2`` per group, two groups per byte);
* ``dn_codes``: the codes of the dense tiles' weights, two per byte, ``ceil(dn_len / 2)`` bytes per row,
  padded likewise;
* ``scales`` (bfloat16) and ``zeros`` (uint8) ``[out, ceil(in / group_size)]``: one scale and zero point
  per row and group of ``group_size`` input columns (the last group may be partial). Groups follow the
  input columns, not the tiles, so a weight's group is ``column // group_size`` whatever its tile's kind.

A weight is ``scale * (code - zero)``, exact in float32, and 0 in pruned positions and all-zero tiles.
:func:`unpack_q4` returns exactly the dequantized masked weight that :func:`tilesparse.quant.dequantize`
gives for the kept positions.

Bytes per weight: 0.5 in dense tiles, ``0.25 + 0.125`` in 2:4 tiles, plus 3 bytes per row and group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ..masks.tiles import SPARSE, TileGrid
from .format import (RI_DN_LEN, RI_MT_OFF, RI_MT_STRIDE, RI_SP_LEN, _kind_columns, _layout, _TiledLayer,
                     kept_positions, pack_from_kinds, pack_nibbles, unpack_nibbles)

FORMAT_VERSION_Q4 = 2
BITS = 4
CODE_ALIGN = 16  # bytes per row stride of sp_codes / dn_codes

# q4_info columns (per tile-row): offsets and row strides (bytes) of sp_codes and dn_codes
QI_SP_OFF, QI_SP_STRIDE, QI_DN_OFF, QI_DN_STRIDE = range(4)


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _layout_q4(kinds: torch.Tensor, grid: TileGrid):
    """The 16-bit layout's ``row_info`` and ``tile_slot`` (for the metadata and K-spaces), the codes' offsets
    and strides per tile-row, and the stored tensors' sizes."""
    info, slot, sizes = _layout(kinds, grid)
    rows = grid.row_sizes().tolist()
    q = torch.zeros(len(rows), 4, dtype=torch.int64)
    sp_off = dn_off = 0
    for r, rh in enumerate(rows):
        sp_len, dn_len = int(info[r, RI_SP_LEN]), int(info[r, RI_DN_LEN])
        sp_stride = _round_up(math.ceil(sp_len / 4), CODE_ALIGN) if sp_len else 0
        dn_stride = _round_up(math.ceil(dn_len / 2), CODE_ALIGN) if dn_len else 0
        q[r] = torch.tensor([sp_off, sp_stride, dn_off, dn_stride])
        sp_off += rh * sp_stride
        dn_off += rh * dn_stride
    sizes = {"tile_kinds": sizes["tile_kinds"], "sp_ptr": sizes["sp_ptr"], "sp_cols": sizes["sp_cols"],
             "dn_ptr": sizes["dn_ptr"], "dn_cols": sizes["dn_cols"], "sp_meta": sizes["sp_meta"],
             "sp_codes": sp_off, "dn_codes": dn_off}
    return info, q, slot, sizes


@dataclass
class PackedHybridQ4(_TiledLayer):
    """One linear weight ``W[out, in]`` in the 4-bit packed hybrid format (see module docstring).

    Stored tensors (saved to disk): :attr:`STORED`. Derived (rebuilt by :meth:`rebuild_layout`): ``row_info``
    (the 16-bit layout's table, for the K-space lengths and metadata offsets), ``q4_info`` (the codes'
    offsets and row strides) and ``tile_slot``.
    """

    out_features: int
    in_features: int
    tile_rows: int
    tile_cols: int
    group_size: int
    tile_kinds: torch.Tensor  # int8 [R, C]
    sp_ptr: torch.Tensor  # int32 [R+1]
    sp_cols: torch.Tensor  # int32 [n_sparse]
    dn_ptr: torch.Tensor  # int32 [R+1]
    dn_cols: torch.Tensor  # int32 [n_dense]
    sp_codes: torch.Tensor  # uint8 [*]
    sp_meta: torch.Tensor  # uint8 [*]
    dn_codes: torch.Tensor  # uint8 [*]
    scales: torch.Tensor  # bfloat16 [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]
    row_info: torch.Tensor = field(default=None)  # int64 [R, 8] (derived)
    q4_info: torch.Tensor = field(default=None)  # int64 [R, 4] (derived)
    tile_slot: torch.Tensor = field(default=None)  # int32 [R, C] (derived)

    STORED = ("tile_kinds", "sp_ptr", "sp_cols", "dn_ptr", "dn_cols", "sp_codes", "sp_meta", "dn_codes",
              "scales", "zeros")
    bits = BITS

    def __post_init__(self) -> None:
        self.rebuild_layout()

    @property
    def n_groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def nbytes(self, include_derived: bool = True) -> int:
        """Bytes of the packed layer (codes, scales, zero points, metadata, indices, tile map; derived tables if
        asked)."""
        n = sum(t.numel() * t.element_size() for t in self.stored_tensors().values())
        if include_derived:
            n += sum(t.numel() * t.element_size() for t in (self.row_info, self.q4_info, self.tile_slot))
        return n

    def sparse_fraction(self) -> float:
        """Fraction of the weights (partial tiles by real size) that lie in 2:4 tiles."""
        numel = self.grid.tile_numel()
        return float(numel[self.tile_kinds.cpu() == SPARSE].sum()) / self.grid.numel

    def rebuild_layout(self) -> None:
        """Recompute the derived tables from the tile map (checks the stored tensors' sizes)."""
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"packed 4-bit layer: group size must be a positive integer, got {self.group_size!r}")
        info, q, slot, sizes = _layout_q4(self.tile_kinds.cpu(), self.grid)
        sizes["scales"] = sizes["zeros"] = self.out_features * self.n_groups
        for name, need in sizes.items():
            have = getattr(self, name).numel()
            if have != need:
                raise ValueError(f"packed 4-bit layer: {name} holds {have} elements, layout needs {need}")
        if self.scales.dtype != torch.bfloat16 or self.zeros.dtype != torch.uint8:
            raise ValueError(f"packed 4-bit layer: scales must be bfloat16 and zeros uint8, got "
                             f"{self.scales.dtype} / {self.zeros.dtype}")
        dev = self.scales.device
        self.row_info, self.q4_info, self.tile_slot = info.to(dev), q.to(dev), slot.to(dev)
        self.__dict__.pop("_mma_q4", None)  # cuda_mma_q4's parameter tables and prepared launches

    def to(self, device=None) -> PackedHybridQ4:
        """A copy on another device."""
        return PackedHybridQ4(**{f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                 for f in fields(self) for v in [getattr(self, f.name)]})

    def unpack(self) -> torch.Tensor:
        """Exact dequantized masked weight ``[out, in]`` in float32 (see :func:`unpack_q4`)."""
        return unpack_q4(self)


def pack_q4(quantized, tile_kinds: torch.Tensor, mask24: torch.Tensor | None,
            tile: tuple[int, int] = (128, 128)) -> PackedHybridQ4:
    """Pack a 4-bit :class:`~tilesparse.quant.QuantizedTensor` (codes ``[out, in]``, bfloat16 scales and zero
    points ``[out, n_groups]``) under a tile map (``SPARSE``/``DENSE``/``ZERO`` per tile) and a 2:4 mask
    (read inside 2:4 tiles only, exactly 2:4 there; ``None`` when no tile is 2:4).

    Dense tiles keep every code, 2:4 tiles the codes of their kept weights, all-zero tiles none.
    """
    codes = quantized.codes
    if getattr(quantized, "bits", BITS) != BITS:
        raise ValueError(f"the packed 4-bit format holds 4-bit codes, got {quantized.bits}-bit ones")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    out, cols = codes.shape
    g = int(quantized.group_size)
    ng = math.ceil(cols / g) if g > 0 else 0
    if g <= 0 or tuple(quantized.scales.shape) != (out, ng) or tuple(quantized.zeros.shape) != (out, ng):
        raise ValueError(f"scales {tuple(quantized.scales.shape)} / zeros {tuple(quantized.zeros.shape)} do not fit "
                         f"codes {tuple(codes.shape)} with group size {g}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes must lie in 0..15 for the packed 4-bit format")
    zeros = quantized.zeros.float()
    if bool(((zeros < 0) | (zeros > 15) | (zeros != zeros.round())).any()):
        raise ValueError("zero points must be integers in 0..15 for the packed 4-bit format")
    # the 16-bit packer lays out the K-spaces and metadata; codes ride in float32 (exact for 0..15)
    carrier = pack_from_kinds(codes.to(torch.float32), tile_kinds, mask24, tile)
    _, q, _, _ = _layout_q4(carrier.tile_kinds.cpu(), carrier.grid)
    dev = codes.device
    sp_parts, dn_parts = [], []
    for r, rh in enumerate(carrier.grid.row_sizes().tolist()):
        sp_len, sp_off, sp_stride, _, _, dn_len, dn_off, dn_stride = carrier.row_info[r].tolist()
        if sp_len:
            v = carrier.sp_vals[sp_off:sp_off + rh * sp_stride].view(rh, sp_stride)[:, :sp_len // 2]
            sp_parts.append(pack_nibbles(v, int(q[r, QI_SP_STRIDE])).reshape(-1))
        if dn_len:
            v = carrier.dn_vals[dn_off:dn_off + rh * dn_stride].view(rh, dn_stride)[:, :dn_len]
            dn_parts.append(pack_nibbles(v, int(q[r, QI_DN_STRIDE])).reshape(-1))

    def cat(xs):
        return torch.cat(xs).contiguous() if xs else torch.zeros(0, dtype=torch.uint8, device=dev)

    return PackedHybridQ4(
        out_features=out, in_features=cols, tile_rows=carrier.tile_rows, tile_cols=carrier.tile_cols,
        group_size=g, tile_kinds=carrier.tile_kinds, sp_ptr=carrier.sp_ptr, sp_cols=carrier.sp_cols,
        dn_ptr=carrier.dn_ptr, dn_cols=carrier.dn_cols, sp_codes=cat(sp_parts), sp_meta=carrier.sp_meta,
        dn_codes=cat(dn_parts), scales=quantized.scales.to(torch.bfloat16).contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
    )


def unpack_q4(p: PackedHybridQ4) -> torch.Tensor:
    """Exact dequantized masked weight ``[out, in]`` (float32): ``scale * (code - zero)`` at kept positions of
    2:4 tiles and every position of dense tiles, 0 elsewhere."""
    dev = p.scales.device
    W = torch.zeros(p.out_features, p.in_features, dtype=torch.float32, device=dev)
    scales, zeros = p.scales.float(), p.zeros.float()
    info, q = p.row_info.cpu(), p.q4_info.cpu()
    sp_ptr, dn_ptr = p.sp_ptr.cpu(), p.dn_ptr.cpu()
    sp_cols, dn_cols = p.sp_cols.cpu(), p.dn_cols.cpu()
    g = p.group_size
    for r, rh in enumerate(p.grid.row_sizes().tolist()):
        r0 = r * p.tile_rows
        sp_len, dn_len = int(info[r, RI_SP_LEN]), int(info[r, RI_DN_LEN])
        sp_off, sp_stride, dn_off, dn_stride = q[r].tolist()
        s, z = scales[r0:r0 + rh], zeros[r0:r0 + rh]
        if dn_len:
            cols = _kind_columns(p, r, dn_ptr, dn_cols).to(dev)
            c = unpack_nibbles(p.dn_codes[dn_off:dn_off + rh * dn_stride].view(rh, dn_stride), dn_len).float()
            grp = cols // g
            W[r0:r0 + rh, cols] = s[:, grp] * (c - z[:, grp])
        if sp_len:
            G = sp_len // 4
            cols = _kind_columns(p, r, sp_ptr, sp_cols).to(dev)  # [sp_len]
            pos = kept_positions(p.sp_meta, int(info[r, RI_MT_OFF]), int(info[r, RI_MT_STRIDE]), rh, sp_len)
            kpos = (torch.arange(G, device=dev) * 4)[None, :, None] + pos  # kept positions in the K-space
            kcol = cols[kpos.reshape(rh, -1)]  # [rh, sp_len/2] input columns of the kept weights
            c = unpack_nibbles(p.sp_codes[sp_off:sp_off + rh * sp_stride].view(rh, sp_stride), sp_len // 2).float()
            grp = kcol // g
            vals = torch.gather(s, 1, grp) * (c - torch.gather(z, 1, grp))
            W[r0:r0 + rh].scatter_(1, kcol, vals)
    return W


def q4_bytes(out_features: int, in_features: int, sparse_fraction: float, group_size: int = 128) -> float:
    """Ideal packed bytes of a 4-bit layer with the given fraction of weights in 2:4 tiles (no padding):
    codes, 2:4 metadata, and a bfloat16 scale plus a uint8 zero point per row and group."""
    n = out_features * in_features
    return n * (0.5 * (1 - sparse_fraction) + sparse_fraction * (0.25 + 0.125)) + \
        out_features * math.ceil(in_features / group_size) * 3


def check_q4_operands(x2: torch.Tensor, packed: PackedHybridQ4, bias: torch.Tensor | None, dtypes: tuple,
                      max_tokens: int, who: str) -> None:
    """The checks a 4-bit kernel ``who`` makes of its operands (one-line ``ValueError`` / ``TypeError``):
    ``x2 [1..max_tokens, in_features]`` of one of ``dtypes`` on the layer's device, bias ``[out_features]`` in
    x's dtype on that device."""
    if not isinstance(x2, torch.Tensor) or x2.dim() != 2 or x2.shape[1] != packed.in_features:
        raise ValueError(f"{who}: x must be [tokens, in_features={packed.in_features}], got "
                         f"{tuple(getattr(x2, 'shape', ()))}")
    if x2.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise TypeError(f"{who}: x must be {names}, got {x2.dtype}")
    if x2.device != packed.device:
        raise ValueError(f"{who}: x is on {x2.device}, the layer on {packed.device}")
    if not 1 <= x2.shape[0] <= max_tokens:
        raise ValueError(f"{who}: takes 1..{max_tokens} tokens, got {x2.shape[0]}")
    if bias is not None:
        if tuple(bias.shape) != (packed.out_features,) or bias.device != x2.device:
            raise ValueError(f"{who}: bias must be [{packed.out_features}] on {x2.device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")
        if bias.dtype != x2.dtype:
            raise TypeError(f"{who}: bias dtype {bias.dtype} does not match x's {x2.dtype}")


__all__ = ["FORMAT_VERSION_Q4", "PackedHybridQ4", "check_q4_operands", "pack_q4", "q4_bytes", "unpack_q4"]
