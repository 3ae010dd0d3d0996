"""Sharded learning checkpoints with :mod:`torch.distributed.checkpoint` (DCP).

A sharded run's checkpoint is the folder ``OUT/checkpoint.dcp``: each process writes its own shards of the
logits and of AdamW's state (keyed by parameter name, through
:func:`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`), DCP records where every shard
lies in the whole tensor, and ``meta.pt`` holds what :func:`tilesparse.learning.load_checkpoint` returns
for a single-file checkpoint, without the tensors: the config, the step, the history and every process's
RNG state. Loading reads the shards a process needs for its own part, whatever the number of processes
that wrote them, so the run resumes on any number of processes (also one, unsharded).

Writes are atomic at the folder level: the new checkpoint is written to ``checkpoint.dcp.new`` (``meta.pt``
last) and then takes the place of the previous one; :func:`checkpoint_dir` finds a complete checkpoint
even when a process stopped between the two renames.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_torch_save

DIRNAME = "checkpoint.dcp"
META = "meta.pt"
_NEW = DIRNAME + ".new"
_OLD = DIRNAME + ".old"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def checkpoint_dir(out: str | os.PathLike) -> Path | None:
    """The complete sharded checkpoint in ``out`` (``checkpoint.dcp``, or the new or previous one that an
    interrupted replacement left), or ``None``."""
    out = Path(out)
    for name in (DIRNAME, _NEW, _OLD):
        if (out / name / META).is_file():
            return out / name
    return None


def read_meta(out: str | os.PathLike) -> dict | None:
    """The ``meta.pt`` of the sharded checkpoint in ``out`` (``None`` without one)."""
    d = checkpoint_dir(out)
    if d is None:
        return None
    return torch.load(d / META, map_location="cpu", weights_only=True)


def _state(logits: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"logits": dict(logits), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded_checkpoint(out: str | os.PathLike, logits: dict[str, torch.Tensor],
                            optimizer: torch.optim.Optimizer, model: nn.Module, meta: dict) -> Path:
    """Write ``OUT/checkpoint.dcp`` (a collective: every process calls it with its own shards).

    ``logits`` maps ``<layer>:<kind>`` to the parameters (DTensors when sharded) and fixed ids, ``model``
    is the module tree that holds them (parameter names key AdamW's state), ``meta`` the small part that
    rank 0 writes as ``meta.pt``."""
    import torch.distributed.checkpoint as dcp

    out = Path(out)
    new, final, old = out / _NEW, out / DIRNAME, out / _OLD
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if new.exists():
            shutil.rmtree(new)
    _barrier()
    state = _state(logits, optimizer, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, checkpoint_id=str(new), no_dist=not _distributed())
    if _rank() == 0:
        atomic_torch_save(meta, new / META)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        new.rename(final)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return final


def load_sharded_checkpoint(out: str | os.PathLike, logits: dict[str, torch.Tensor],
                            optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Fill ``logits`` (in place: each process its own shards) and ``optimizer``'s state from the sharded
    checkpoint in ``out``, resharding to this run's processes (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    d = checkpoint_dir(out)
    if d is None:
        raise FileNotFoundError(f"no sharded checkpoint in {out}")
    state = _state(logits, optimizer, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(d), no_dist=not _distributed())
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def discard_sharded_checkpoint(out: str | os.PathLike) -> int:
    """Delete the sharded checkpoint folders in ``out``; returns the bytes freed."""
    freed = 0
    for name in (DIRNAME, _NEW, _OLD):
        d = Path(out) / name
        if d.is_dir():
            freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d)
    return freed


__all__ = ["DIRNAME", "checkpoint_dir", "read_meta", "save_sharded_checkpoint", "load_sharded_checkpoint",
           "discard_sharded_checkpoint"]
