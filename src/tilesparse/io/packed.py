"""Packed hybrid checkpoints: safetensors files with JSON metadata.

A file holds, for every packed layer ``name``, its stored tensors as ``"{name}::{field}"`` (see
:attr:`tilesparse.kernels.format.PackedHybrid.STORED`; derived tables are rebuilt on load) and its
bias as ``"{name}::bias"``; any other tensors (the rest of a model's state) as ``"state::{key}"``;
the model's non-persistent buffers (e.g. rotary ``inv_freq``, which ``state_dict`` leaves out and a model
built on the meta device would hold as garbage) as ``"buffer::{key}"``, listed under ``"buffers"``.
The safetensors header metadata key ``"tilesparse"`` holds JSON: format name and version, and per
layer its shape, tile size and dtype; a 4-bit layer (:class:`~tilesparse.kernels.format_q4.PackedHybridQ4`)
also says ``"format": "q4"`` and its group size. A file with 4-bit layers is version
:data:`~tilesparse.kernels.format_q4.FORMAT_VERSION_Q4`; one without them keeps version 1, which libraries that
know only 16-bit layers read. Tensors shared in memory (tied embeddings) are stored once and
listed under ``"aliases"``.

So a pruned model ships in its packed size: the file is the packed linears plus the untouched rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..kernels.format import FORMAT_VERSION, PackedHybrid
from ..kernels.format_q4 import FORMAT_VERSION_Q4, PackedHybridQ4

FORMAT_NAME = "tilesparse-packed"
_SEP = "::"


def format_version(layers) -> int:
    """The file format version for these packed layers: 2 when any is 4-bit, else 1 (what libraries that know
    only 16-bit layers read)."""
    return FORMAT_VERSION_Q4 if any(isinstance(p, PackedHybridQ4) for p in layers) else FORMAT_VERSION


def save_packed(path: str | Path, layers: dict[str, PackedHybrid | PackedHybridQ4], biases: dict[str, torch.Tensor] | None = None,
                state: dict[str, torch.Tensor] | None = None, extra_metadata: dict | None = None,
                buffers: dict[str, torch.Tensor] | None = None) -> int:
    """Write packed layers (+ optional biases, other state tensors and non-persistent buffers) to a
    safetensors file; returns its size in bytes."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta_layers = {}
    for name, p in layers.items():
        if _SEP in name:
            raise ValueError(f"layer name {name!r} must not contain {_SEP!r}")
        for field, t in p.stored_tensors().items():
            tensors[f"{name}{_SEP}{field}"] = t.detach().contiguous().cpu()
        b = (biases or {}).get(name)
        if b is not None:
            tensors[f"{name}{_SEP}bias"] = b.detach().contiguous().cpu()
        meta_layers[name] = {"out_features": p.out_features, "in_features": p.in_features,
                             "tile_rows": p.tile_rows, "tile_cols": p.tile_cols, "has_bias": b is not None}
        if isinstance(p, PackedHybridQ4):
            meta_layers[name].update({"format": "q4", "bits": p.bits, "group_size": p.group_size,
                                      "dtype": str(b.dtype if b is not None else torch.bfloat16).replace("torch.", "")})
        else:
            meta_layers[name]["dtype"] = str(p.dtype).replace("torch.", "")
    aliases = {}
    seen: dict[tuple, str] = {}
    for key, t in (state or {}).items():
        sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and sig in seen:
            aliases[key] = seen[sig]
            continue
        seen[sig] = key
        tensors[f"state{_SEP}{key}"] = t.detach().contiguous().cpu()
    for key, t in (buffers or {}).items():
        tensors[f"buffer{_SEP}{key}"] = t.detach().contiguous().cpu()
    meta = {"format": FORMAT_NAME, "version": format_version(layers.values()), "layers": meta_layers, "aliases": aliases,
            "buffers": sorted(buffers or {})}
    if extra_metadata:
        meta["extra"] = extra_metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"tilesparse": json.dumps(meta)})
    return path.stat().st_size


def load_packed(path: str | Path, device: str | torch.device = "cpu"):
    """Read a file written by :func:`save_packed`.

    Returns ``(layers: dict[name, PackedHybrid | PackedHybridQ4], biases: dict[name, Tensor], state: dict[key, Tensor], meta)``;
    the non-persistent buffers are in ``meta["buffer_tensors"]`` (absent in files written before they were saved).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        raw = (f.metadata() or {}).get("tilesparse")
        if raw is None:
            raise ValueError(f"{path}: not a tilesparse packed file (no 'tilesparse' metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: unknown format {meta.get('format')!r}")
        if int(meta.get("version", -1)) > FORMAT_VERSION_Q4:
            raise ValueError(f"{path}: format version {meta['version']} is newer than this library's "
                             f"{FORMAT_VERSION_Q4}")
        keys = set(f.keys())
        layers, biases = {}, {}
        for name, info in meta["layers"].items():
            cls = {None: PackedHybrid, "q4": PackedHybridQ4}.get(info.get("format"))
            if cls is None:
                raise ValueError(f"{path}: layer {name!r} has unknown layer format {info.get('format')!r}")
            kw = {}
            for field in cls.STORED:
                k = f"{name}{_SEP}{field}"
                if k not in keys:
                    raise ValueError(f"{path}: layer {name!r} misses tensor {field!r}")
                kw[field] = f.get_tensor(k)
            if cls is PackedHybridQ4:
                kw["group_size"] = int(info["group_size"])
            layers[name] = cls(out_features=int(info["out_features"]), in_features=int(info["in_features"]),
                               tile_rows=int(info["tile_rows"]), tile_cols=int(info["tile_cols"]), **kw)
            if info.get("has_bias"):
                biases[name] = f.get_tensor(f"{name}{_SEP}bias")
        state = {k[len("state" + _SEP):]: f.get_tensor(k) for k in keys if k.startswith("state" + _SEP)}
        if "buffers" in meta:
            meta["buffer_tensors"] = {k: f.get_tensor(f"buffer{_SEP}{k}") for k in meta["buffers"]}
    for alias, src in meta.get("aliases", {}).items():
        state[alias] = state[src]
    return layers, biases, state, meta


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``state_dict`` leaves out (``persistent=False``), by their full name; those of
    ``HybridLinear`` layers (derived tables, rebuilt from the packed tensors) excepted."""
    from ..kernels.linear import HybridLinear
    from ..kernels.linear_q4 import HybridLinearQ4

    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (HybridLinear, HybridLinearQ4)):
            continue
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(b)
            if t is not None:
                out[f"{mod_name}.{b}" if mod_name else b] = t
    return out


def save_packed_model(model: nn.Module, path: str | Path, extra_metadata: dict | None = None,
                      buffers: dict[str, torch.Tensor] | None = None) -> int:
    """Save a model converted with :func:`tilesparse.kernels.convert_model`: its ``HybridLinear``
    layers packed, every other parameter/buffer as is. ``buffers`` (default: the model's own) are the
    non-persistent buffers to ship; pass the ones of the model before a dtype cast to keep e.g. rotary
    frequencies in fp32. Returns the file size in bytes."""
    from ..kernels.linear import HybridLinear
    from ..kernels.linear_q4 import HybridLinearQ4

    hyb = {n: m for n, m in model.named_modules() if isinstance(m, (HybridLinear, HybridLinearQ4))}
    prefixes = tuple(n + "." for n in hyb)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    if buffers is None:
        buffers = non_persistent_buffers(model)
    return save_packed(path, {n: m.packed for n, m in hyb.items()},
                       {n: m.bias for n, m in hyb.items() if m.bias is not None}, state, extra_metadata, buffers)


def load_packed_model(model: nn.Module, path: str | Path, use_triton: bool | None = None, *,
                      device: str | torch.device | None = None) -> nn.Module:
    """Load a file of :func:`save_packed_model` into ``model`` (same architecture, e.g. built from its
    config): the packed layers replace the ``nn.Linear`` modules of the same names, the rest of the
    state is loaded strictly. The model's device and dtype are kept. Returns ``model``.

    A model still on the meta device (built under ``torch.device("meta")`` and not materialised) is filled
    in place on ``device`` (default CPU), in its dtype: the packed layers are built there first and every other
    tensor is the file's, so the dense weights are never allocated (a packed model that fits a GPU loads on
    it even where the dense one would not)."""
    from ..kernels.linear import HybridLinear, _set_submodule
    from ..kernels.linear_q4 import HybridLinearQ4

    ref = next(iter(model.parameters()), None)
    on_meta = ref is not None and ref.is_meta
    if on_meta:
        device = torch.device(device if device is not None else "cpu")
    else:
        device = ref.device if ref is not None else torch.device("cpu")
    layers, biases, state, meta = load_packed(path, device)
    if ref is not None and ref.dtype.is_floating_point:  # packed values follow the model's dtype (not 4-bit codes)
        layers = {n: p if isinstance(p, PackedHybridQ4) or p.dtype == ref.dtype else p.to(dtype=ref.dtype)
                  for n, p in layers.items()}
        biases = {n: b.to(ref.dtype) for n, b in biases.items()}
    names = dict(model.named_modules())
    for name, p in layers.items():
        old = names.get(name)
        if not isinstance(old, (nn.Linear, HybridLinear, HybridLinearQ4)):
            raise ValueError(f"{path}: packed layer {name!r} has no nn.Linear of that name in the model")
        if (old.out_features, old.in_features) != p.shape:
            raise ValueError(f"{name}: packed shape {p.shape} != model's {(old.out_features, old.in_features)}")
        new = HybridLinearQ4(p, biases.get(name)) if isinstance(p, PackedHybridQ4) else \
            HybridLinear(p, biases.get(name), use_triton)
        _set_submodule(model, name, new)
    if on_meta:  # the file's tensors become the model's, in the dtypes the model was built with
        own = model.state_dict(keep_vars=True)
        state = {k: v.to(device=device, dtype=own[k].dtype) if k in own else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=on_meta)
    hyb_prefixes = tuple(n + "." for n in layers)
    missing = [k for k in missing if not k.startswith(hyb_prefixes)]
    if missing or unexpected:
        raise ValueError(f"{path}: state does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wanted = non_persistent_buffers(model)
    shipped = meta.get("buffer_tensors")
    if shipped is None and wanted:
        raise ValueError(f"{path} was written without the model's non-persistent buffers ({sorted(wanted)[:2]}...); "
                         "export it again with this version (`tilesparse run` re-exports automatically)")
    if set(wanted) - set(shipped or {}):
        raise ValueError(f"{path}: non-persistent buffers missing from the file: {sorted(set(wanted) - set(shipped))[:3]}")
    for key, t in (shipped or {}).items():
        parent, _, b = key.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        if b not in mod._buffers:
            raise ValueError(f"{path}: buffer {key!r} has no place in the model")
        mod._buffers[b] = t.to(device)
    return model
