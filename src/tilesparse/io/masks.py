"""Mask artifacts: a mask-only file that applies to the unmodified base model, and pruned HF folders.

File layout (``DIR/masks.safetensors``, or any ``*.safetensors`` path), one entry per pruned linear:

- ``<layer>.kinds``: int8 ``[tile_rows, tile_cols]`` tile map (hybrid only; 0 = 2:4, 1 = dense, 2 = zero);
- ``<layer>.ids``: uint8, the layer's 2:4 pattern ids (0..5, one per group of 4 along ``in``) packed
  3 bits each (:func:`tilesparse.masks.pack_ids`) (2:4 and hybrid);
- ``<layer>.keep``: uint8, the unstructured keep-mask packed 1 bit per weight, little-endian bit order.

The safetensors metadata holds ``format`` (``tilesparse-mask``), ``format_version`` and ``header``: a
JSON object with every layer's shape, pattern and tile size, a SHA-256 of all tensor bytes, and the
mask set's ``meta`` (model, weight fingerprint, method, pattern, tile, target and measured sparsity,
calibration set...). Masks use the ``[out, in]`` orientation whatever the module stores.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import TilesparseError
from ..masks.maskset import LayerMask, MaskSet
from ..masks.nm import pack_ids, unpack_ids
from ..masks.tiles import DENSE, SPARSE, ZERO, TileGrid

FORMAT = "tilesparse-mask"
FORMAT_VERSION = 1
FILENAME = "masks.safetensors"


# --------------------------------------------------------------------------- bit packing


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, 8 entries per byte, little-endian bit order (flat)."""
    arr = mask.detach().to(torch.bool).cpu().reshape(-1).numpy()
    return torch.from_numpy(np.packbits(arr, bitorder="little").copy())


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    n = int(np.prod(shape)) if len(shape) else 1
    need = (n + 7) // 8
    if packed.numel() != need:
        raise ValueError(f"packed bits hold {packed.numel()} bytes, expected {need} for shape {tuple(shape)}")
    bits = np.unpackbits(packed.cpu().numpy().astype(np.uint8), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


# --------------------------------------------------------------------------- paths


def _mask_path(path: str | os.PathLike, *, for_write: bool) -> Path:
    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        return p
    if p.is_file():
        return p
    if for_write or p.is_dir():
        return p / FILENAME
    raise TilesparseError(f"mask artifact {p} does not exist")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- save / load


def save_mask_artifact(maskset: MaskSet, path: str | os.PathLike) -> Path:
    """Write ``maskset`` as a mask-only artifact; ``path`` is a directory or a ``.safetensors`` file.

    Returns the file written (atomically: a temporary file renamed into place).
    """
    from safetensors.torch import save_file

    target = _mask_path(path, for_write=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for lm in maskset:
        entry = {"shape": [lm.out_features, lm.in_features], "pattern": lm.pattern, "tile": list(lm.tile)}
        if lm.pattern == "unstructured":
            tensors[f"{lm.name}.keep"] = pack_bits(lm.keep)
        if lm.pattern in ("2:4", "hybrid"):
            tensors[f"{lm.name}.ids"] = pack_ids(lm.ids.cpu())
        if lm.pattern == "hybrid":
            tensors[f"{lm.name}.kinds"] = lm.kinds.to(torch.int8).cpu().contiguous()
        layers[lm.name] = entry
    header = {"layers": layers, "sha256": _digest(tensors), "meta": maskset.meta}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "header": json.dumps(header, default=_json_default)}
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (Path, torch.dtype)):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_mask_header(path: str | os.PathLike) -> dict:
    """The JSON header (layers, meta) of a mask artifact, after checking its format and version."""
    return _open(_mask_path(path, for_write=False))[0]


def _open(p: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not p.is_file():
        raise TilesparseError(f"mask artifact {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError...
        raise TilesparseError(f"{p} is not a readable mask artifact (truncated or corrupt: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise TilesparseError(f"{p} is not a tilesparse mask artifact (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise TilesparseError(f"{p} has mask format version {version}; this tilesparse reads version "
                              f"{FORMAT_VERSION}")
    try:
        header = json.loads(metadata["header"])
        header["layers"], header["meta"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise TilesparseError(f"{p}: the mask header is missing or corrupt") from None
    if header.get("sha256") != _digest(tensors):
        raise TilesparseError(f"{p}: mask data does not match its checksum (corrupt file)")
    return header, tensors


def load_mask_artifact(path: str | os.PathLike, model: torch.nn.Module | None = None, *,
                       check_fingerprint: bool = True) -> MaskSet:
    """Read a mask artifact written by :func:`save_mask_artifact`.

    With ``model``, check that every masked layer exists with the same shape and (unless
    ``check_fingerprint=False``) that the model's weights are the ones the mask was made for.
    Every problem is a one-line :class:`TilesparseError`.
    """
    p = _mask_path(path, for_write=False)
    header, tensors = _open(p)
    layers: dict[str, LayerMask] = {}
    try:
        for name, e in header["layers"].items():
            out, inp = (int(v) for v in e["shape"])
            tile = tuple(int(v) for v in e["tile"])
            pattern = e["pattern"]
            kw: dict = {}
            if pattern == "unstructured":
                kw["keep"] = unpack_bits(tensors[f"{name}.keep"], (out, inp))
            if pattern in ("2:4", "hybrid"):
                kw["ids"] = unpack_ids(tensors[f"{name}.ids"], (out, inp // 4))
            if pattern == "hybrid":
                kinds = tensors[f"{name}.kinds"].to(torch.int8)
                if kinds.numel() and not bool(((kinds == SPARSE) | (kinds == DENSE) | (kinds == ZERO)).all()):
                    raise ValueError(f"{name}: tile kinds outside 0..2")
                if tuple(kinds.shape) != TileGrid(out, inp, *tile).shape:
                    raise ValueError(f"{name}: tile map of shape {tuple(kinds.shape)} does not fit the layer")
                kw["kinds"] = kinds
            layers[name] = LayerMask(name, out, inp, pattern, tile, **kw)
    except (KeyError, ValueError) as exc:
        raise TilesparseError(f"{p}: inconsistent mask data ({exc})") from None
    ms = MaskSet(layers, dict(header["meta"]))
    if model is not None:
        check_mask_fits(ms, model, check_fingerprint=check_fingerprint, what=str(p))
    return ms


def check_mask_fits(maskset: MaskSet, model: torch.nn.Module, *, check_fingerprint: bool = True,
                    what: str = "mask") -> None:
    """Raise :class:`TilesparseError` unless every mask matches a prunable linear of ``model``."""
    from ..models import find_prunable_linears, weights_fingerprint

    linears = {l.name: l for l in find_prunable_linears(model)}
    for lm in maskset:
        l = linears.get(lm.name)
        if l is None:
            raise TilesparseError(f"{what} is for a different model: it masks {lm.name}, which this model "
                                  f"({type(model).__name__}) does not have")
        if (l.out_features, l.in_features) != (lm.out_features, lm.in_features):
            raise TilesparseError(f"{what} is for a different model: {lm.name} is {l.out_features}x"
                                  f"{l.in_features} here, {lm.out_features}x{lm.in_features} in the mask")
    missing = [n for n in linears if n not in maskset.layers]
    if missing:
        raise TilesparseError(f"{what} is for a different model: it has no mask for {missing[0]} "
                              f"(and {len(missing) - 1} more layers)" if len(missing) > 1 else
                              f"{what} is for a different model: it has no mask for {missing[0]}")
    fp = maskset.meta.get("fingerprint")
    if check_fingerprint and fp is not None:
        mine = weights_fingerprint(model)
        if mine != fp:
            raise TilesparseError(f"{what} was made for model {maskset.meta.get('model', '?')!r} with weight "
                                  f"fingerprint {fp}; this model's weights differ ({mine})")


# --------------------------------------------------------------------------- apply


@torch.no_grad()
def apply_masks(model: torch.nn.Module, maskset: MaskSet) -> int:
    """Zero, in place, every weight of ``model`` that ``maskset`` prunes. Returns the number zeroed.

    Checks layer names and shapes (not the fingerprint: see :func:`load_mask_artifact`).
    """
    check_mask_fits(maskset, model, check_fingerprint=False)
    from ..models import find_prunable_linears

    zeroed = 0
    for l in find_prunable_linears(model):
        lm = maskset.layers[l.name]
        if lm.pattern == "dense":
            continue
        keep = lm.to_bool()
        l.apply_mask(keep)
        zeroed += int((~keep).sum())
    return zeroed


def apply_mask_file(loaded, path: str | os.PathLike, *, check_fingerprint: bool = True) -> MaskSet:
    """Load a mask artifact for a :class:`~tilesparse.models.LoadedModel` (checked) and apply it in place."""
    ms = load_mask_artifact(path, loaded.model, check_fingerprint=check_fingerprint)
    apply_masks(loaded.model, ms)
    return ms


def save_pruned_model(loaded, out_dir: str | os.PathLike, maskset: MaskSet | None = None) -> Path:
    """Save the (pruned) model and its tokenizer as a Hugging Face folder (``save_pretrained``).

    With ``maskset``, its artifact is written next to the weights (``out_dir/masks.safetensors``, with
    the fingerprint of the unmodified model it was made for).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TilesparseError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    try:
        loaded.model.save_pretrained(str(out))
    except Exception as exc:
        raise TilesparseError(f"cannot save the model to {out}: {str(exc).splitlines()[0]}") from exc
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(out))
    if maskset is not None:
        save_mask_artifact(maskset, out / FILENAME)
    return out
