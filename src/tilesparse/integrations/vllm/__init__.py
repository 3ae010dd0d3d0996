"""Serving packed exports with vLLM: the ``tilesparse`` quantization method.

Installed with tilesparse, the ``vllm.general_plugins`` entry point :func:`register` runs in each vLLM
process and registers the method. A packed export (``tilesparse export``) says
``"quantization_config": {"quant_method": "tilesparse", ...}`` in its ``config.json``, so that::

    from vllm import LLM
    LLM(model="path/to/export").generate(...)      # or: vllm serve path/to/export

loads ``model.packed.safetensors`` as it is: every packed linear keeps its packed hybrid weight (one
packed matrix per part of vLLM's fused q/k/v and gate/up layers) and runs
:func:`tilesparse.kernels.ops.hybrid_linear` (the GPU kernels on CUDA, the torch reference on the CPU).
Tensor parallelism is not supported (a ``ValueError`` at load says so), nor is an export of a newer
format version or one whose packed layers vLLM does not build as linear layers (:class:`UnsupportedExport`).

Importing this module does not import vLLM; :mod:`.method` does.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import TilesparseError

QUANT_METHOD = "tilesparse"

_registered = False


class UnsupportedExport(TilesparseError):
    """A packed export that the vLLM plugin cannot serve (raised at load, with a one-line message).

    Not a ``ValueError``: vLLM's config validation would wrap one in a multi-line pydantic report."""


def register() -> None:
    """vLLM plugin entry point: register the ``tilesparse`` quantization method (idempotent).

    Also asks Linux for the AMX tile state, without which vLLM's bf16 attention on AMX CPUs dies with SIGILL.
    """
    global _registered
    if _registered:
        return
    try:
        import torch

        torch._C._cpu._init_amx()
    except Exception:  # not an x86 CPU with AMX, or a torch without this (private) call
        pass
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .method import TileSparseConfig

    register_quantization_config(QUANT_METHOD)(TileSparseConfig)
    _registered = True


def quantization_config(format_version: int | None = None) -> dict:
    """The ``quantization_config`` entry a packed export's ``config.json`` carries (what vLLM reads);
    ``format_version``: the packed file's (default: the 16-bit format's)."""
    from ...kernels.format import FORMAT_VERSION
    from ...io.packed import FORMAT_NAME
    from ...models.loading import PACKED_FILE

    return {"quant_method": QUANT_METHOD, "format": FORMAT_NAME, "format_version": format_version or FORMAT_VERSION,
            "packed_file": PACKED_FILE}


def check_format(fmt, version, where: str) -> None:
    """Raise :class:`UnsupportedExport` unless ``fmt``/``version`` name a packed format this library reads."""
    from ...io.packed import FORMAT_NAME
    from ...kernels.format import FORMAT_VERSION
    from ...kernels.format_q4 import FORMAT_VERSION_Q4

    if fmt is not None and fmt != FORMAT_NAME:
        raise UnsupportedExport(f"tilesparse: {where}: unknown format {fmt!r} (this library reads {FORMAT_NAME!r})")
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise UnsupportedExport(f"tilesparse: {where}: format version {version!r} is not a number") from None
    if v == FORMAT_VERSION_Q4:
        raise UnsupportedExport(f"tilesparse: {where}: 4-bit packed exports (format version {v}) are not served by "
                                "the vLLM plugin yet; load them with tilesparse.load_model")
    if not 1 <= v <= FORMAT_VERSION:
        raise UnsupportedExport(f"tilesparse: {where}: format version {v} is not supported by this tilesparse's "
                                f"vLLM plugin (it serves 1..{FORMAT_VERSION}); upgrade tilesparse or export again")


def read_packed_header(path: str | Path) -> dict:
    """The JSON metadata of a packed file (format, version, per-layer shapes and tiles), checked, without
    reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UnsupportedExport(f"tilesparse: {path} not found: not a packed export")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("tilesparse")
    if raw is None:
        raise UnsupportedExport(f"tilesparse: {path} has no 'tilesparse' metadata: not a packed export")
    meta = json.loads(raw)
    check_format(meta.get("format"), meta.get("version"), str(path))
    return meta


__all__ = ["QUANT_METHOD", "UnsupportedExport", "check_format", "quantization_config", "read_packed_header",
           "register"]
