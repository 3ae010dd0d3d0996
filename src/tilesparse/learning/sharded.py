"""Sharded mask learning: PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) over the decoder blocks.

Each decoder block becomes one FSDP unit holding its frozen weights and the mask logits of its linears;
the root unit holds the rest (embeddings, final norm, LM head). Every parameter is sharded over the
processes of the launch: weights and tile logits along their first dimension, the candidate-major 2:4
pattern logits ``[6, out, in/4]`` along ``out`` (so that the argmax over the six candidates of the final
mask needs no communication; along the candidates when ``out`` is not a multiple of the number of
processes). AdamW's state lives beside the shards. A block's parameters are gathered for its forward and
again for its backward; the gradients of the logits are reduce-scattered (averaged) after every backward.

Learning runs on a structural copy of the model (:func:`fork_model`: new module objects, the same tensors),
so FSDP never changes the caller's modules; on CUDA the caller's own parameters wait on the CPU while the
copy learns (:func:`offload_parameters`), and come back afterwards.

Compute dtype: the dtype of the model (load it in bfloat16 for bf16 compute); the logits, their gradients
and AdamW's state are float32 whatever the model's dtype (the fp32 master logits; no cast on the way to the
mask, which is built in float32 and cast to the weight's dtype once).

:func:`resolve_shard` chooses sharding when it is not forced: on CUDA, when the replicated learning state
(:func:`learning_bytes`) would take more than :data:`AUTO_FRACTION` of a GPU's memory.
"""

from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TilesparseError
from ..masks.nm import GROUP, N_PATTERNS
from ..masks.tiles import TileGrid

AUTO_FRACTION = 0.6  # replicated state above this share of one GPU's memory: shard (activations need the rest)


def _fsdp():
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise TilesparseError(f"sharded learning needs torch >= 2.6 with torch.distributed (FSDP2): "
                              f"{str(exc).splitlines()[0]}") from None
    return fully_shard, Shard


def is_dtensor(t) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (a sharded parameter or its gradient)."""
    if t is None or not dist.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a DTensor (a collective), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


@torch.no_grad()
def copy_full_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the whole tensor ``src`` into ``dst``, a plain tensor or a DTensor (each process keeps its shard)."""
    if not is_dtensor(dst):
        dst.copy_(src.to(dst.device, dst.dtype))
        return
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.to_local().copy_(part.to_local())


# -- memory ----------------------------------------------------------------------------------
def learning_bytes(model: nn.Module, mode: str, tile: tuple[int, int]) -> dict[str, int]:
    """Bytes one process holds when learning is replicated: the model's parameters, the fp32 logits, their
    gradients and AdamW's two moments, and the fixed 2:4 ids (PATCH-Tile). Activations are not counted."""
    from ..models import find_prunable_linears

    seen, weights = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * p.element_size()
    logits = ids = 0
    for lin in find_prunable_linears(model):
        if lin.in_features % GROUP:
            continue
        groups = lin.out_features * (lin.in_features // GROUP)
        if mode in ("joint", "tile"):
            g = TileGrid(lin.out_features, lin.in_features, *tile)
            logits += g.n_rows * g.n_cols
        if mode in ("joint", "maskllm"):
            logits += groups * N_PATTERNS
        else:
            ids += groups
    logit_bytes = 4 * logits
    out = {"weights": weights, "logits": logit_bytes, "gradients": logit_bytes, "optimizer": 2 * logit_bytes,
           "ids": ids}
    out["total"] = sum(out.values())
    return out


def resolve_shard(requested: bool | None, world: int, model: nn.Module, mode: str, tile: tuple[int, int],
                  device: torch.device) -> bool:
    """Whether this run shards: never with one process; ``requested`` when given; otherwise (``None``) on
    CUDA when :func:`learning_bytes` exceeds :data:`AUTO_FRACTION` of the device's memory (the decision of
    any process holds for all)."""
    if world <= 1 or requested is False:
        return False
    if requested:
        _fsdp()
        return True
    decide = False
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        decide = learning_bytes(model, mode, tile)["total"] > AUTO_FRACTION * total
    flag = torch.tensor([1.0 if decide else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        _fsdp()
        return True
    return False


# -- the model copy --------------------------------------------------------------------------
def fork_model(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer with it (new module objects,
    the same tensors): FSDP can then replace the copy's parameters and classes without touching ``model``."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def offload_parameters(model: nn.Module) -> callable:
    """Move ``model``'s CUDA parameters to the CPU (the same parameter objects); returns the function that
    moves them back. A no-op for a model on the CPU."""
    moved: list[tuple[nn.Parameter, torch.device]] = []
    seen = set()
    for p in model.parameters():
        if id(p) in seen or p.device.type == "cpu":
            continue
        seen.add(id(p))
        moved.append((p, p.device))
        p.data = p.data.to("cpu")

    def restore() -> None:
        for param, dev in moved:
            param.data = param.data.to(dev)
        moved.clear()

    return restore


class Sharder:
    """Applies FSDP2 to a forked model: :meth:`shard_block` per decoder block as soon as its linears carry
    their logits (rank 0's values are broadcast first, so every process shards the same logits), then
    :meth:`shard_root` once for the rest of the model."""

    def __init__(self, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        _fsdp()
        self.world = dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world,))
        self._patterns: list[nn.Parameter] = []  # the pattern logits of the block being sharded

    def _placement(self, param: nn.Parameter):
        _, Shard = _fsdp()
        if any(param is p for p in self._patterns) and param.shape[1] % self.world == 0:
            return Shard(1)  # [6, out, in/4] along out
        return None  # FSDP's default, Shard(0)

    @torch.no_grad()
    def shard_block(self, block: nn.Module, layers: Iterable[nn.Module]) -> None:
        """Broadcast rank 0's logits and ids of ``layers`` (the block's masked linears) and shard ``block``."""
        fully_shard, _ = _fsdp()
        for layer in layers:
            for t in (layer.tile_logits, layer.pattern_logits, layer.ids):
                if t is not None:
                    dist.broadcast(t.data, src=0)
            if layer.pattern_logits is not None:
                self._patterns.append(layer.pattern_logits)
        try:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=True, shard_placement_fn=self._placement)
        finally:
            self._patterns.clear()

    def shard_root(self, model: nn.Module) -> None:
        """Shard the parameters outside the decoder blocks (the root unit, unsharded through a whole step)."""
        fully_shard, _ = _fsdp()
        fully_shard(model, mesh=self.mesh)


__all__ = ["AUTO_FRACTION", "is_dtensor", "local", "full_tensor", "copy_full_into", "learning_bytes",
           "resolve_shard", "fork_model", "offload_parameters", "Sharder"]
