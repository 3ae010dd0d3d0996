"""The hybrid matmul as a PyTorch operator: ``torch.ops.tilesparse.hybrid_linear``.

Registered with :func:`torch.library.custom_op`, so ``torch.compile`` (``fullgraph=True`` included) traces a
model with :class:`~.linear.HybridLinear` layers without graph breaks: the compiler sees one opaque node per
layer, its fake implementation gives the output's shape, dtype and device, and the real one runs whatever
:func:`~.ops.hybrid_linear` picks (the kernels on CUDA, the torch reference elsewhere).

Arguments: the input, the packed layer's tensors in :data:`OP_TENSORS` order (the layer's buffers, so a
compiled graph and a CUDA graph read them in place), the bias, the layer's dimensions
``[out_features, in_features, tile_rows, tile_cols]`` and the kernel choice (``-1`` automatic, ``0``
reference, ``1`` Triton). The layer's :class:`PackedHybrid` (with its kernel plans and prepared launches) is
found from the storage of its tensors, so no argument names a particular layer: layers of one shape and the
same tile counts give the compiler the same call. (Compiling each decoder block on its own still compiles
again for blocks whose packed tensors differ in size: the compiler treats module buffers as static-shaped.)
Tensors that are not a registered layer's (a copy made elsewhere) are used through a layout rebuilt for them,
slower but never wrong.
"""

from __future__ import annotations

import weakref

import torch

from .format import PackedHybrid

OP_TENSORS = (*PackedHybrid.STORED, "row_info", "tile_slot")

_LAYERS: "weakref.WeakValueDictionary[tuple, PackedHybrid]" = weakref.WeakValueDictionary()


def _storage_key(row_info: torch.Tensor) -> tuple:
    # a live layer holds its row_info (never empty), so no other live tensor starts at that address
    return (str(row_info.device), row_info.data_ptr())


def register_layer(packed: PackedHybrid) -> None:
    """Make ``packed`` the layer the operator uses for calls on its tensors (held weakly: the module owns
    it)."""
    _LAYERS[_storage_key(packed.row_info)] = packed


def op_tensors(packed: PackedHybrid) -> list[torch.Tensor]:
    """The packed layer's tensors in the operator's argument order."""
    return [getattr(packed, name) for name in OP_TENSORS]


def _resolve(tensors: list[torch.Tensor], dims: list[int]) -> PackedHybrid:
    p = _LAYERS.get(_storage_key(tensors[OP_TENSORS.index("row_info")]))
    if p is not None and all(getattr(p, n) is t or (getattr(p, n).data_ptr() == t.data_ptr()
                                                     and getattr(p, n).shape == t.shape
                                                     and getattr(p, n).device == t.device)
                             for n, t in zip(OP_TENSORS, tensors)):
        return p
    stored = dict(zip(OP_TENSORS, tensors))
    out_features, in_features, tile_rows, tile_cols = dims
    return PackedHybrid(out_features, in_features, tile_rows, tile_cols,
                        **{n: stored[n] for n in PackedHybrid.STORED})


def _check_counts(tensors: list[torch.Tensor], dims: list[int]) -> None:
    if len(tensors) != len(OP_TENSORS) or len(dims) != 4:
        raise ValueError(f"tilesparse::hybrid_linear takes {len(OP_TENSORS)} packed tensors and 4 dimensions, "
                         f"got {len(tensors)} and {len(dims)}")


@torch.library.custom_op("tilesparse::hybrid_linear", mutates_args=())
def hybrid_linear_op(x: torch.Tensor, packed: list[torch.Tensor], bias: torch.Tensor | None, dims: list[int],
                     use_triton: int) -> torch.Tensor:
    """``x @ (W*M)^T + bias`` for the packed layer given by ``packed`` / ``dims`` (see module doc)."""
    from .ops import hybrid_linear

    _check_counts(packed, dims)
    layer = _resolve(packed, dims)
    return hybrid_linear(x, layer, bias, use_triton=None if use_triton < 0 else bool(use_triton))  # checks x


@hybrid_linear_op.register_fake
def _hybrid_linear_fake(x, packed, bias, dims, use_triton):
    from .ops import check_operands

    _check_counts(packed, dims)
    vals = packed[OP_TENSORS.index("dn_vals")]
    check_operands(x, bias, dims[1], dims[0], vals.dtype, vals.device)
    return x.new_empty((*x.shape[:-1], dims[0]))




@torch.library.custom_op("tilesparse::hybrid_linear_q4", mutates_args=())
def hybrid_linear_q4_op(x: torch.Tensor, packed: list[torch.Tensor], bias: torch.Tensor | None,
                        dims: list[int]) -> torch.Tensor:
    """``x @ W^T + bias`` for a 4-bit packed layer given by its stored tensors (``PackedHybridQ4.STORED``
    order) and ``dims`` ``[out_features, in_features, tile_rows, tile_cols, group_size]``: the torch reference
    (dequantize, then ``F.linear`` in ``x``'s dtype) on every device."""
    from .format_q4 import PackedHybridQ4

    if len(packed) != len(PackedHybridQ4.STORED) or len(dims) != 5:
        raise ValueError(f"tilesparse::hybrid_linear_q4 takes {len(PackedHybridQ4.STORED)} packed tensors and 5 "
                         f"dimensions, got {len(packed)} and {len(dims)}")
    p = PackedHybridQ4(*dims, **dict(zip(PackedHybridQ4.STORED, packed)))
    return _q4_reference(x, p, bias)


def _q4_reference(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    w = p.unpack().to(device=x.device, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@hybrid_linear_q4_op.register_fake
def _hybrid_linear_q4_fake(x, packed, bias, dims):
    if x.shape[-1] != dims[1]:
        raise ValueError(f"input's last dimension is {x.shape[-1]}, the layer expects in_features={dims[1]}")
    return x.new_empty((*x.shape[:-1], dims[0]))


__all__ = ["OP_TENSORS", "register_layer", "op_tensors", "hybrid_linear_op", "hybrid_linear_q4_op"]
