"""Atomic file writes: write a temporary file in the same folder, then ``os.replace`` (never a torn file)."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``; the folder is created
    if needed and the temporary file removed if the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(text.encode("utf-8"), path)


__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_text"]
