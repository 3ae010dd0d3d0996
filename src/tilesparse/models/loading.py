"""Load any HF causal LM: a local folder, a GGUF file, a hub id (when reachable) or the default."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import TilesparseError
from .discovery import find_prunable_linears

PACKED_FILE = "model.packed.safetensors"  # a folder exported in the packed hybrid format

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    name: str  # human-readable name for reports
    source: str  # path or hub id actually loaded

    @property
    def needs_bos(self) -> bool:
        """True when every window should start with BOS (Gemma-family models)."""
        mt = getattr(self.model.config, "model_type", "")
        return mt.startswith("gemma") and getattr(self.tokenizer, "bos_token_id", None) is not None

    @property
    def bos_id(self) -> int | None:
        """The token every window starts with when the model needs BOS, else None."""
        return self.tokenizer.bos_token_id if self.needs_bos else None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``float32``, ``bf16``...) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise TilesparseError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}") from None


def load_model(spec: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "float32",
               device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``spec`` may be ``None``/``"default"`` (the embedded SmolLM2), the name of another embedded model
    (``gemma3-270m``; see :mod:`.embedded`), an HF model folder, a ``.gguf`` file (dequantized by
    transformers), or a hub id (only when the hub is reachable). The model is put in
    eval mode; a :class:`TilesparseError` explains any failure in one line.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import EMBEDDED_MODELS, embedded_model_dir, embedded_model_key

    torch_dtype = resolve_dtype(dtype)
    gguf_file = None
    key = embedded_model_key("" if spec is None else str(spec))
    if key is not None and (key == "default" or not Path(str(spec)).expanduser().exists()):
        path, name = str(embedded_model_dir(key)), EMBEDDED_MODELS[key].name
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise TilesparseError(f"model folder {p} has no config.json")
            path, name = str(p), p.name
        elif p.is_file():
            if p.suffix.lower() != ".gguf":
                raise TilesparseError(f"model file {p} is not a .gguf file (give a folder or a GGUF file)")
            path, name, gguf_file = str(p.parent), p.stem, p.name
        elif str(spec).startswith((".", "/", "~")) or os.sep in str(spec) and str(spec).count("/") != 1:
            raise TilesparseError(f"model path {spec} does not exist")
        else:
            path, name = str(spec), str(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file is None and (Path(path) / PACKED_FILE).is_file():
        return _load_packed_folder(Path(path), name, torch_dtype, device)
    try:
        # weights straight to a GPU instead of through host memory (a GGUF is dequantized on the host)
        placed = {"device_map": device} if device != "cpu" and not gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs, **placed)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(path).exists():
            raise TilesparseError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from exc
        raise TilesparseError(
            f"model {spec!r} is neither a local path nor reachable on the Hugging Face hub "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    model.to(device).eval()
    find_prunable_linears(model)  # fail early for architectures without decoder linears
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=path if not gguf_file else str(spec))


def _load_packed_folder(path: Path, name: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """A folder exported in the packed hybrid format: architecture from its config, weights packed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..io.packed import load_packed_model

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # no dense weights: the packed layers and the file's other tensors fill it
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        load_packed_model(model, path / PACKED_FILE, device=device)
    except ValueError as exc:
        raise TilesparseError(f"cannot load packed model {path}: {exc}") from exc
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise TilesparseError(f"cannot load packed model {path}: the file lacks {len(left)} of the model's "
                              f"tensors ({', '.join(left[:3])})")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"{name} (packed hybrid)", source=str(path))


def model_context_length(model: nn.Module) -> int | None:
    """Longest sequence the model's config allows, if it says."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    text_cfg = getattr(cfg, "text_config", None)
    return model_context_length(type("M", (), {"config": text_cfg})()) if text_cfg is not None else None


def weights_fingerprint(model: nn.Module) -> str:
    """Short, fast fingerprint of the prunable weights (shapes + a strided sample of every tensor)."""
    h = hashlib.sha256()
    for layer in find_prunable_linears(model):
        w = layer.module.weight.detach()
        h.update(f"{layer.name}:{tuple(w.shape)}:".encode())
        flat = w.reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
