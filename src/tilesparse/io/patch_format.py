"""Interop with the mask files released by the PATCH authors (``mask.npz``).

Layout of their archive (``np.savez_compressed``; read with ``np.load(..., allow_pickle=False)``):

- ``<param>``: uint8, ``np.packbits`` of the flattened (C order) boolean keep-mask of one weight,
  big-endian bit order (the first weight is the most significant bit of byte 0; the last byte is
  zero-padded). ``<param>`` is the parameter name in the HF model,
  e.g. ``model.layers.0.self_attn.q_proj.weight``; every 2-D ``.weight`` inside the decoder blocks.
- ``<param>.__shape__``: int64 ``[2]``, the weight's shape as the module stores it (``[out, in]`` for
  ``nn.Linear``).
- ``__meta__``: a 0-d string array holding a JSON object (``base_model``, ``method``, ``variant``,
  ``sparsity`` such as ``"45%"``, ``pattern``, ``measured_sparsity``...).

Their files do not record the tile size (the released masks use 128x128 tiles). Files written here
add ``tile`` (``[rows, cols]``; ``layer_tiles`` when layers differ) and the whole tilesparse ``meta``
(under ``tilesparse``) to ``__meta__``; their loader ignores extra keys.

A weight that the file leaves out is not pruned (their loader only touches the listed weights).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TilesparseError
from ..masks.maskset import LayerMask, MaskSet
from ..masks.nm import ids_from_mask
from ..masks.tiles import DENSE, SPARSE, ZERO, TileGrid
from .masks import _json_default

PATCH_FILENAME = "mask.npz"
META_KEY = "__meta__"
SHAPE_SUFFIX = ".__shape__"
WEIGHT_SUFFIX = ".weight"
DEFAULT_TILE = (128, 128)
BIT_ORDER = "big"  # np.packbits / np.unpackbits default, what their loader uses
FORMAT_NOTE = "bit-packed uint8 (np.packbits, big-endian bits) of the flat keep mask; unpack with np.unpackbits"

# "<stack leaf>.<block index>.<name inside the block>.weight", e.g. "layers.3.mlp.up_proj.weight"
_BLOCK_RELATIVE = re.compile(r"(?:^|\.)([A-Za-z_]\w*\.\d+\..+)$")
_FIRST_PATTERN = torch.tensor([True, True, False, False])


# --------------------------------------------------------------------------- reading


def read_patch_mask(path: str | os.PathLike, model: torch.nn.Module | None = None,
                    tile=None) -> MaskSet:
    """Read a PATCH ``mask.npz`` (or a folder holding one) into a :class:`MaskSet`.

    Every masked weight becomes a layer named like our prunable linears (the parameter name without
    ``.weight``). Groups of 4 along ``in`` must keep 2 or 4 weights; every tile of the grid must be
    dense (all kept), 2:4 or empty, else a :class:`TilesparseError` names the layer, the tile and the
    first offending group. A layer is ``2:4`` when all its tiles are, ``hybrid`` otherwise (``dense``
    when ``in`` is not a multiple of 4 and nothing is pruned).

    ``tile`` (``128``, ``"64x128"``, ``(rows, cols)``) sets the tile size; without it the size the file
    records is used, else 128x128.

    With ``model``: keys are matched to ``find_prunable_linears(model)`` (exactly, else by block index
    and name inside the block, so a wrapper prefix does not matter), shapes are checked in the
    module's own orientation (GPT-2 ``Conv1D`` masks are transposed to ``[out, in]``), linears the file
    leaves out are ``dense`` (listed in ``meta["unmasked_layers"]``), and ``meta`` records the model
    name and weight fingerprint as pruning does.
    """
    p = _npz_path(path, for_write=False)
    data = _open_npz(p)
    try:
        their_meta = _read_meta(data, p)
        keys = _mask_keys(data, p)
        linears = _prunable_by_name(model) if model is not None else None
        names = _match_keys(keys, linears, model, p) if linears is not None else {k: _strip_weight(k) for k in keys}
        layers: dict[str, LayerMask] = {}
        for key in keys:
            name = names[key]
            keep = _unpack_keep(data, key, p)
            if linears is not None:
                keep = _to_out_in(keep, linears[name], key, p)
            layers[name] = layer_mask_from_keep(name, keep, _layer_tile(tile, their_meta, name),
                                                what=f"{p.name}: {name}")
    finally:
        data.close()
    unmasked: list[str] = []
    if linears is not None:
        layers, unmasked = _in_model_order(layers, linears, tile, their_meta)
    ms = MaskSet(layers)
    ms.meta = _imported_meta(ms, their_meta, p, model, unmasked)
    if tile is not None:
        ms.meta["tile"] = list(_parse_tile(tile))
    return ms


def layer_mask_from_keep(name: str, keep: torch.Tensor, tile=DEFAULT_TILE, *, what: str | None = None) -> LayerMask:
    """The ``2:4`` / ``hybrid`` (or ``dense``) :class:`LayerMask` of a boolean ``[out, in]`` keep-mask.

    Raises :class:`TilesparseError` (naming ``what``, default ``name``) for a mask that is not made of
    dense, 2:4 and empty tiles at this tile size. Pattern ids inside dense and empty tiles are 0.
    """
    what = what or name
    tile = _parse_tile(tile)
    keep = keep.bool()
    out, inp = keep.shape
    if inp % 4:
        if bool(keep.all()):
            return LayerMask(name, out, inp, "dense", tile)
        raise TilesparseError(f"{what}: in_features {inp} is not a multiple of 4, so the layer can only be "
                              f"dense, but the mask prunes {int((~keep).sum())} weights")
    grid = TileGrid(out, inp, *tile)
    counts = keep.reshape(out, inp // 4, 4).sum(-1, dtype=torch.int8)
    kinds = _tile_kinds(counts, grid, what)
    ids = _pattern_ids(keep, counts)
    if bool((kinds == SPARSE).all()):
        return LayerMask(name, out, inp, "2:4", tile, ids=ids)
    return LayerMask(name, out, inp, "hybrid", tile, kinds=kinds, ids=ids)


def _tile_kinds(counts: torch.Tensor, grid: TileGrid, what: str) -> torch.Tensor:
    """DENSE / SPARSE / ZERO per tile from the kept count of every group ``[out, in/4]``."""
    rows, gcols = grid.tile_rows, grid.tile_cols // 4
    groups = grid.tile_numel() // 4
    full = _sum_per_tile(counts == 4, rows, gcols)
    two = _sum_per_tile(counts == 2, rows, gcols)
    empty = _sum_per_tile(counts == 0, rows, gcols)
    kinds = torch.full(grid.shape, -1, dtype=torch.int8)
    kinds[two == groups] = SPARSE
    kinds[full == groups] = DENSE
    kinds[empty == groups] = ZERO
    bad = kinds < 0
    if bool(bad.any()):
        raise TilesparseError(_bad_tile_message(counts, grid, bad, what))
    return kinds


def _sum_per_tile(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Sum a ``[R, C]`` tensor over blocks of ``rows x cols`` (edge blocks partial) -> int64."""
    x = x.to(torch.int32)
    pr, pc = (-x.shape[0]) % rows, (-x.shape[1]) % cols
    if pr or pc:
        x = F.pad(x, (0, pc, 0, pr))
    return x.reshape(x.shape[0] // rows, rows, x.shape[1] // cols, cols).sum(dim=(1, 3), dtype=torch.int64)


def _bad_tile_message(counts: torch.Tensor, grid: TileGrid, bad: torch.Tensor, what: str) -> str:
    r, c = (int(v) for v in bad.nonzero()[0])
    r0, c0 = r * grid.tile_rows, c * grid.tile_cols
    r1, c1 = min(r0 + grid.tile_rows, grid.out_features), min(c0 + grid.tile_cols, grid.in_features)
    block = counts[r0:r1, c0 // 4:c1 // 4]
    odd = ((block != 2) & (block != 4)).nonzero()
    if odd.numel():
        i, j = (int(v) for v in odd[0])
        why = (f"the group at row {r0 + i}, columns {c0 + 4 * j}-{c0 + 4 * j + 3} keeps {int(block[i, j])} "
               f"of 4 weights")
    else:
        why = f"it mixes fully kept groups ({int((block == 4).sum())}) with 2:4 groups ({int((block == 2).sum())})"
    more = int(bad.sum()) - 1
    return (f"{what}: tile ({r}, {c}) (rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1}, tile size "
            f"{grid.tile_rows}x{grid.tile_cols}) is neither dense nor 2:4: {why}"
            + (f" ({more} more such tiles)" if more else ""))


def _pattern_ids(keep: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """2:4 pattern ids of every group; groups that do not keep exactly two get pattern 0."""
    out, inp = keep.shape
    g = keep.reshape(out, inp // 4, 4)
    filled = torch.where((counts == 2).unsqueeze(-1), g, _FIRST_PATTERN)
    return ids_from_mask(filled.reshape(out, inp))


def _npz_path(path: str | os.PathLike, *, for_write: bool) -> Path:
    """``path`` itself for a file (or a ``.npz`` to write), else ``path/mask.npz``."""
    p = Path(path).expanduser()
    if p.is_dir() or (for_write and p.suffix != ".npz"):
        return p / PATCH_FILENAME
    if not for_write and not p.is_file():
        raise TilesparseError(f"PATCH mask file {p} does not exist")
    return p


def _open_npz(p: Path):
    if not p.is_file():
        raise TilesparseError(f"PATCH mask file {p} does not exist")
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise TilesparseError(f"{p} is not a readable .npz mask file ({_first_line(exc)})") from None


def _read_meta(data, p: Path) -> dict:
    if META_KEY not in data.files:
        return {}
    try:
        meta = json.loads(str(data[META_KEY]))
    except (ValueError, TypeError) as exc:
        raise TilesparseError(f"{p}: {META_KEY} is not a JSON object ({_first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise TilesparseError(f"{p}: {META_KEY} is not a JSON object")
    return meta


def _mask_keys(data, p: Path) -> list[str]:
    keys = [k for k in data.files if k != META_KEY and not k.endswith(SHAPE_SUFFIX)]
    if not keys:
        raise TilesparseError(f"{p} holds no masks")
    missing = [k for k in keys if k + SHAPE_SUFFIX not in data.files]
    if missing:
        raise TilesparseError(f"{p}: {missing[0]} has no {missing[0]}{SHAPE_SUFFIX} entry (not a PATCH mask file?)")
    return keys


def _unpack_keep(data, key: str, p: Path) -> torch.Tensor:
    """The boolean keep-mask of ``key`` in the shape the file records."""
    try:
        shape = tuple(int(v) for v in np.asarray(data[key + SHAPE_SUFFIX]).reshape(-1))
        packed = np.asarray(data[key])
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise TilesparseError(f"{p}: cannot read {key} ({_first_line(exc)})") from None
    if len(shape) != 2 or min(shape) <= 0:
        raise TilesparseError(f"{p}: {key} has shape {shape}; masks of 2-D weights are expected")
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise TilesparseError(f"{p}: {key} is {packed.dtype} {packed.shape}, expected flat bit-packed uint8")
    n = shape[0] * shape[1]
    if packed.size != math.ceil(n / 8):
        raise TilesparseError(f"{p}: {key} holds {packed.size} bytes, {math.ceil(n / 8)} expected for shape "
                              f"{shape[0]}x{shape[1]} (truncated or corrupt)")
    bits = np.unpackbits(packed, count=n, bitorder=BIT_ORDER).view(np.bool_)
    return torch.from_numpy(bits.reshape(shape))


def _strip_weight(key: str) -> str:
    return key[: -len(WEIGHT_SUFFIX)] if key.endswith(WEIGHT_SUFFIX) else key


def _prunable_by_name(model: torch.nn.Module) -> dict:
    from ..models import find_prunable_linears

    return {l.name: l for l in find_prunable_linears(model)}


def _block_relative(name: str) -> str | None:
    m = _BLOCK_RELATIVE.search(name)
    return m.group(1) if m else None


def _match_keys(keys: list[str], linears: dict, model: torch.nn.Module, p: Path) -> dict[str, str]:
    """``{file key: our layer name}``: exact parameter name, else the same block index and inner name."""
    relative: dict[str, str | None] = {}
    for name in linears:
        rel = _block_relative(name)
        if rel is not None:
            relative[rel] = None if rel in relative else name  # None marks an ambiguous suffix
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for key in keys:
        base = _strip_weight(key)
        name = base if base in linears else relative.get(_block_relative(base) or "")
        if name is None or not key.endswith(WEIGHT_SUFFIX):
            raise TilesparseError(f"{p} is for a different model: it masks {key}, which is not the weight of a "
                                  f"prunable linear of this model ({type(model).__name__})")
        if name in owner:
            raise TilesparseError(f"{p}: {owner[name]} and {key} both map to layer {name}")
        names[key] = name
        owner[name] = key
    return names


def _to_out_in(keep: torch.Tensor, linear, key: str, p: Path) -> torch.Tensor:
    """Check the file's shape against the module's weight and return the mask as ``[out, in]``."""
    stored = tuple(int(v) for v in linear.module.weight.shape)
    if tuple(keep.shape) != stored:
        raise TilesparseError(f"{p} is for a different model: {key} is {keep.shape[0]}x{keep.shape[1]} in the "
                              f"mask, {stored[0]}x{stored[1]} in the model ({linear.name})")
    return keep.t() if linear.transposed else keep


def _in_model_order(layers: dict[str, LayerMask], linears: dict, tile, their_meta: dict):
    """Layers in the model's order; prunable linears the file leaves out become ``dense``."""
    ordered: dict[str, LayerMask] = {}
    unmasked: list[str] = []
    for name, l in linears.items():
        if name in layers:
            ordered[name] = layers[name]
        else:
            unmasked.append(name)
            ordered[name] = LayerMask(name, l.out_features, l.in_features, "dense", _layer_tile(tile, their_meta, name))
    return ordered, unmasked


def _parse_tile(tile) -> tuple[int, int]:
    from ..pruning.config import parse_tile

    return parse_tile(tile)


def _layer_tile(tile, their_meta: dict, name: str) -> tuple[int, int]:
    """Tile size of a layer: the ``tile`` argument, else the file's record, else 128x128."""
    if tile is not None:
        return _parse_tile(tile)
    recorded = (their_meta.get("layer_tiles") or {}).get(name, their_meta.get("tile"))
    if recorded is None:
        return DEFAULT_TILE
    try:
        return _parse_tile(recorded)
    except TilesparseError as exc:
        raise TilesparseError(f"the tile size recorded in the mask file is invalid: {exc}") from None


def _imported_meta(ms: MaskSet, their_meta: dict, p: Path, model, unmasked: list[str]) -> dict:
    """Our ``meta`` for a read file: the embedded tilesparse meta if present, else one built from theirs."""
    if isinstance(their_meta.get("tilesparse"), dict):
        meta = dict(their_meta["tilesparse"])
    else:
        patterns = {lm.pattern for lm in ms}
        tiles = {lm.tile for lm in ms}
        meta = {
            "model": their_meta.get("base_model"),
            "method": str(their_meta.get("method") or "patch").lower(),
            "pattern": "2:4" if patterns <= {"2:4", "dense"} else "hybrid",
            "tile": list(next(iter(tiles))) if len(tiles) == 1 else None,
            "target_sparsity": _parse_sparsity(their_meta.get("sparsity")),
            "measured_sparsity": ms.sparsity(),
            "source": {"format": "patch-npz", "file": str(p), "meta": their_meta},
        }
    if model is not None:
        from ..models import weights_fingerprint

        cfg = getattr(model, "config", None)
        meta["model"] = str(getattr(cfg, "_name_or_path", "") or type(model).__name__)
        meta["fingerprint"] = weights_fingerprint(model)
        if unmasked:
            meta["unmasked_layers"] = unmasked
    return meta


def _parse_sparsity(value) -> float | None:
    """``"45%"`` -> 0.45, ``0.45`` -> 0.45; anything else -> ``None``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        try:
            return float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            return None
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- writing


def write_patch_mask(maskset: MaskSet, path: str | os.PathLike, model: torch.nn.Module | None = None) -> Path:
    """Write ``maskset`` as a PATCH ``mask.npz`` (``path``: a ``.npz`` file, else a folder to write it in).

    One bit-packed entry plus its shape per layer, keyed by the parameter name (``<layer>.weight``),
    and a ``__meta__`` JSON that also carries the tile size and our ``meta`` (so :func:`read_patch_mask`
    gives the same masks back). Masks are written ``[out, in]`` (``nn.Linear``'s orientation); pass
    ``model`` to write layers whose module stores ``[in, out]`` (GPT-2 ``Conv1D``) the way it does.
    Returns the file written (atomically).
    """
    target = _npz_path(path, for_write=True)
    transposed = _transposed_layers(maskset, model) if model is not None else set()
    arrays: dict[str, np.ndarray] = {META_KEY: np.array(json.dumps(_export_meta(maskset), default=_json_default))}
    for lm in maskset:
        keep = lm.to_bool()
        if lm.name in transposed:
            keep = keep.t()
        key = lm.name + WEIGHT_SUFFIX
        arrays[key] = np.packbits(keep.contiguous().numpy().reshape(-1), bitorder=BIT_ORDER)
        arrays[key + SHAPE_SUFFIX] = np.array(keep.shape, dtype=np.int64)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _transposed_layers(maskset: MaskSet, model: torch.nn.Module) -> set[str]:
    from .masks import check_mask_fits

    check_mask_fits(maskset, model, check_fingerprint=False)
    return {name for name, l in _prunable_by_name(model).items() if l.transposed}


def _export_meta(maskset: MaskSet) -> dict:
    """``__meta__`` for a written file: their keys (``base_model``, ``sparsity``...) plus tile and our meta."""
    meta = maskset.meta
    patterns = {lm.pattern for lm in maskset}
    tiles = {lm.name: list(lm.tile) for lm in maskset}
    distinct = {tuple(t) for t in tiles.values()}
    target = meta.get("target_sparsity")
    out = {
        "base_model": meta.get("model"),
        "method": meta.get("method"),
        "sparsity": f"{100 * target:g}%" if isinstance(target, (int, float)) else None,
        "pattern": ("2:4" if patterns <= {"2:4", "dense"} else
                    "Dense/2:4 tiles" if "unstructured" not in patterns else "unstructured"),
        "format": FORMAT_NOTE,
        "measured_sparsity": round(maskset.sparsity(), 4),
        "tile": list(next(iter(distinct))) if len(distinct) == 1 else None,
        "tilesparse": meta,
    }
    if len(distinct) > 1:
        out["layer_tiles"] = tiles
    return out


__all__ = ["PATCH_FILENAME", "layer_mask_from_keep", "read_patch_mask", "write_patch_mask"]
