"""The hybrid matmuls as PyTorch operators: ``torch.ops.tilesparse.hybrid_linear`` (16-bit layers) and
``torch.ops.tilesparse.hybrid_linear_q4`` (4-bit layers).

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

``torch.ops.tilesparse.hybrid_unpack`` (same tensors and dimensions) returns the layer's dense masked weight,
written by the Triton kernel ``unpack_kernel``; ``HybridLinear`` uses it in compiled graphs for prefills
(unless ``TILESPARSE_COMPILED_UNPACK=0``).

The 4-bit operator takes the layer's stored tensors (``PackedHybridQ4.STORED`` order) and ``[out_features,
in_features, tile_rows, tile_cols, group_size]``; its CUDA implementation finds the registered
:class:`~.format_q4.PackedHybridQ4` the same way and runs :func:`q4_linear` (for 1-16 bfloat16/float16 tokens
the sparse-tensor-core kernel of :mod:`.cuda_mma_q4` where it applies, else the Triton kernel of
:mod:`.triton_q4`; above 16 tokens ``F.linear`` on the dequantized weight; the torch reference otherwise); on
other devices it runs the torch reference. ``torch.ops.tilesparse.hybrid_unpack_q4`` returns a 4-bit layer's
dequantized weight (the Triton kernel ``unpack_q4_kernel``); ``HybridLinearQ4`` uses it in compiled graphs above 16
tokens (unless ``TILESPARSE_COMPILED_UNPACK=0``).
"""

from __future__ import annotations

import functools
import weakref

import torch

from .format import PackedHybrid
from .ops import interpreting as _interpreting

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


try:  # (triton is optional: without it the hybrid operator runs the torch reference)
    from .triton_hybrid import unpack_kernel as _unpack_kernel
except Exception:  # pragma: no cover - depends on the environment
    _unpack_kernel = None


def _hybrid_unpack(packed: list[torch.Tensor], dims: list[int]) -> torch.Tensor:
    """The packed layer's dense masked weight ``[out_features, in_features]`` (arguments as for
    ``hybrid_linear``), written by ``unpack_kernel``: ``torch.ops.tilesparse.hybrid_unpack``. A Triton operator
    (``torch.library.triton_op``), so a compiled graph launches the kernel through the compiler's own launcher
    and plans the returned buffer with its other temporaries; under Triton's CPU interpreter an opaque custom
    operator instead (the interpreter's kernels cannot be traced)."""
    from .ops import unpack_launch

    _check_counts(packed, dims)
    t = dict(zip(OP_TENSORS, packed))
    out = torch.empty(dims[0], dims[1], dtype=t["dn_vals"].dtype, device=t["dn_vals"].device)
    grid, args, consts = unpack_launch(out, t, *dims)
    torch.library.wrap_triton(_unpack_kernel)[grid](*args, **consts)
    return out


def _hybrid_unpack_fake(packed, dims):
    _check_counts(packed, dims)
    return packed[OP_TENSORS.index("dn_vals")].new_empty(dims[0], dims[1])


def _triton_operator(name: str, fn, kernel, fake):
    """``fn`` as the operator ``tilesparse::<name>``: a ``torch.library.triton_op``, or, under Triton's CPU
    interpreter (whose kernels cannot be traced into a graph), an opaque custom operator with the fake
    implementation ``fake``; ``None`` where ``kernel`` could not be imported."""
    if kernel is None:  # pragma: no cover - depends on the environment
        return None
    if not _interpreting():
        return torch.library.triton_op(f"tilesparse::{name}", mutates_args=())(fn)
    op = torch.library.custom_op(f"tilesparse::{name}", mutates_args=())(fn)
    op.register_fake(fake)
    return op


hybrid_unpack_op = _triton_operator("hybrid_unpack", _hybrid_unpack, _unpack_kernel, _hybrid_unpack_fake)


_Q4_LAYERS: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()


def register_layer_q4(packed) -> None:
    """Make the 4-bit layer ``packed`` (a :class:`~.format_q4.PackedHybridQ4`) the one the 4-bit operator uses for
    calls on its tensors, so that its derived tables are not rebuilt per call (held weakly: the module owns it)."""
    _Q4_LAYERS[_storage_key(packed.scales)] = packed


def _resolve_q4(tensors: list[torch.Tensor], dims: list[int]):
    """The registered 4-bit layer over exactly these stored tensors and dimensions, else one built for them."""
    from .format_q4 import PackedHybridQ4

    p = _Q4_LAYERS.get(_storage_key(tensors[PackedHybridQ4.STORED.index("scales")]))
    if p is not None and [p.out_features, p.in_features, p.tile_rows, p.tile_cols, p.group_size] == list(dims) \
            and all(_same_tensor(getattr(p, n), t) for n, t in zip(PackedHybridQ4.STORED, tensors)):
        return p
    return PackedHybridQ4(*dims, **dict(zip(PackedHybridQ4.STORED, tensors)))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype
                      and a.device == b.device)


def _check_counts_q4(tensors: list[torch.Tensor], dims: list[int]) -> None:
    from .format_q4 import PackedHybridQ4

    if len(tensors) != len(PackedHybridQ4.STORED) or len(dims) != 5:
        raise ValueError(f"tilesparse::hybrid_linear_q4 takes {len(PackedHybridQ4.STORED)} packed tensors and 5 "
                         f"dimensions, got {len(tensors)} and {len(dims)}")


@torch.library.custom_op("tilesparse::hybrid_linear_q4", mutates_args=())
def hybrid_linear_q4_op(x: torch.Tensor, packed: list[torch.Tensor], bias: torch.Tensor | None,
                        dims: list[int]) -> torch.Tensor:
    """``x @ W^T + bias`` for a 4-bit packed layer given by its stored tensors (``PackedHybridQ4.STORED``
    order) and ``dims`` ``[out_features, in_features, tile_rows, tile_cols, group_size]``: the torch reference
    (dequantize, then ``F.linear`` in ``x``'s dtype) on the CPU and other devices; on CUDA :func:`q4_linear` (the
    Triton kernel where it applies)."""
    from .format_q4 import PackedHybridQ4

    _check_counts_q4(packed, dims)
    p = PackedHybridQ4(*dims, **dict(zip(PackedHybridQ4.STORED, packed)))
    return _q4_reference(x, p, bias)


@hybrid_linear_q4_op.register_kernel("cuda")
def _hybrid_linear_q4_cuda(x, packed, bias, dims):
    _check_counts_q4(packed, dims)
    return q4_linear(x, _resolve_q4(packed, dims), bias)


def _q4_reference(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    w = p.unpack().to(device=x.device, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


Q4_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
Q4_KERNEL_MAX_TOKENS = 16


@functools.cache
def _q4_triton_launcher():
    """:func:`.triton_q4.q4_linear_triton`, or ``None`` where Triton cannot be imported."""
    try:
        from .triton_q4 import q4_linear_triton
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return q4_linear_triton


def _x_fits_kernel(x: torch.Tensor, p) -> bool:
    """``x`` on CUDA on the layer's device, bfloat16 or float16, ``in_features`` wide, no gradient to track (the
    kernels have no backward; the reference keeps ``x``'s gradient)."""
    return (x.is_cuda and x.dtype in Q4_KERNEL_DTYPES and x.dim() >= 1 and x.shape[-1] == p.in_features
            and x.device == p.device and not (x.requires_grad and torch.is_grad_enabled()))


def _tokens(x: torch.Tensor, p) -> int:
    return x.numel() // max(1, p.in_features)


def q4_kernel_applies(x: torch.Tensor, p) -> bool:
    """Whether :func:`q4_linear` can run the Triton kernel for ``x`` on the 4-bit layer ``p``: ``x`` on CUDA on the
    layer's device, bfloat16 or float16, ``in_features`` wide, 1..16 tokens, no gradient to track, a tile width
    the kernel takes and Triton importable."""
    if not _x_fits_kernel(x, p):
        return False
    tc = p.tile_cols
    return (1 <= _tokens(x, p) <= Q4_KERNEL_MAX_TOKENS and tc >= 16 and tc & (tc - 1) == 0
            and _q4_triton_launcher() is not None)


def q4_mma_applies(x: torch.Tensor, p) -> bool:
    """Whether :func:`q4_linear` runs the 4-bit sparse-tensor-core kernel (:mod:`.cuda_mma_q4`) for ``x`` on ``p``:
    not switched off (``TILESPARSE_Q4_MMA=0``), ``x`` as for the Triton kernel with 1 to
    :data:`.cuda_mma_q4.DISPATCH_TOKENS` tokens, and the layer supported (:func:`.cuda_mma_q4.mma_q4_supported`)
    with a group size that is a multiple of 32 (:data:`.cuda_mma_q4.DISPATCH_GROUPS`: the sizes checked on a GPU)."""
    from ..settings import setting

    if not (setting("q4_mma") and _x_fits_kernel(x, p)):
        return False
    from . import cuda_mma_q4

    return (1 <= _tokens(x, p) <= cuda_mma_q4.DISPATCH_TOKENS and p.group_size % cuda_mma_q4.DISPATCH_GROUPS == 0
            and cuda_mma_q4.mma_q4_supported(p))


def q4_unpack_tile_fits(tile_cols: int) -> bool:
    """Whether ``unpack_q4_kernel`` takes tiles ``tile_cols`` wide: its column chunks are a power of two of at
    least 8 dividing the width (the eager route, :func:`q4_unpack_applies`, and the compiled one,
    ``HybridLinearQ4``, both ask here)."""
    return tile_cols % 8 == 0


def q4_unpack_applies(x: torch.Tensor, p) -> bool:
    """Whether :func:`q4_linear` runs ``x`` on ``p`` as ``F.linear`` on the weight dequantized by
    :func:`.triton_q4.unpack_q4_triton` (prefill): ``x`` as for the Triton kernel with more than
    :data:`Q4_KERNEL_MAX_TOKENS` tokens, a tile width the kernel takes (:func:`q4_unpack_tile_fits`), and the
    Triton kernels not failed here."""
    return (_x_fits_kernel(x, p) and _tokens(x, p) > Q4_KERNEL_MAX_TOKENS and q4_unpack_tile_fits(p.tile_cols)
            and _Q4_TRITON_FAILED[0] is None and _q4_triton_launcher() is not None)


def _q4_unpack(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on the layer's weight dequantized into a per-device scratch buffer in ``x``'s dtype (the
    buffer is reused by every layer; the torch reference if the kernel fails on this machine)."""
    from .ops import _buffer
    from .triton_q4 import unpack_q4_triton

    N, K = p.out_features, p.in_features
    w = _buffer("q4_unpack", x.device, N * K, x.dtype)[: N * K].view(N, K)
    try:
        unpack_q4_triton(p, w)
    except (ValueError, TypeError):
        raise
    except Exception as e:  # noqa: BLE001 - the kernel itself (compilation, launch) on this machine
        _q4_triton_failed(e)
        return _q4_reference(x, p, bias)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _q4_mma(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    """The 4-bit product by the sparse-tensor-core kernel in its default configuration for the device."""
    from . import cuda_mma_q4

    x2 = x.reshape(-1, p.in_features)
    cfg = cuda_mma_q4.layer_config(x2.shape[0], p)
    b = None if bias is None else bias.to(x.dtype)
    return cuda_mma_q4.q4_mma_linear(x2, p, b, **cfg).reshape(*x.shape[:-1], p.out_features)


def q4_linear(x: torch.Tensor, p, bias: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for the 4-bit layer ``p``, ``x [..., in]`` -> ``[..., out]`` in ``x``'s dtype: the
    sparse-tensor-core kernel (:mod:`.cuda_mma_q4`) where :func:`q4_mma_applies`, the weight dequantized on the
    device and ``F.linear`` where :func:`q4_unpack_applies` (more than 16 tokens), else the Triton kernel
    (:mod:`.triton_q4`) where :func:`q4_kernel_applies`, else the torch reference (dequantize + ``F.linear``);
    ``use_triton`` forces the Triton kernel or the reference (``True`` on the CPU needs ``TRITON_INTERPRET=1``)."""
    chosen = use_triton is None
    if chosen:
        if q4_mma_applies(x, p):
            return _q4_mma(x, p, bias)
        if q4_unpack_applies(x, p):
            return _q4_unpack(x, p, bias)
        use_triton = _Q4_TRITON_FAILED[0] is None and q4_kernel_applies(x, p)
    if not use_triton:
        return _q4_reference(x, p, bias)
    launch = _q4_triton_launcher()
    if launch is None:
        raise RuntimeError("the 4-bit Triton kernel needs triton, which cannot be imported here")
    b = None if bias is None else bias.to(x.dtype)
    try:
        y = launch(x.reshape(-1, p.in_features), p, b)
    except (ValueError, TypeError):  # the operands: the caller's to fix
        raise
    except Exception as e:  # noqa: BLE001 - the kernel itself (compilation, launch) on this machine
        if not chosen:
            raise
        _q4_triton_failed(e)
        return _q4_reference(x, p, bias)
    return y.reshape(*x.shape[:-1], p.out_features)


_Q4_TRITON_FAILED: list = [None]  # why the 4-bit Triton kernel failed in this process, once it has


def _q4_triton_failed(error: Exception) -> None:
    """Remember that the 4-bit Triton kernel failed here and say so once: from now on :func:`q4_linear` runs the
    torch reference (the kernel is checked under Triton's CPU interpreter, not yet on every GPU)."""
    import warnings

    _Q4_TRITON_FAILED[0] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
    warnings.warn(f"tilesparse: the 4-bit Triton kernel failed on this machine ({_Q4_TRITON_FAILED[0]}); 4-bit "
                  "layers run the torch reference from now on", RuntimeWarning, stacklevel=3)


@hybrid_linear_q4_op.register_fake
def _hybrid_linear_q4_fake(x, packed, bias, dims):
    if x.shape[-1] != dims[1]:
        raise ValueError(f"input's last dimension is {x.shape[-1]}, the layer expects in_features={dims[1]}")
    return x.new_empty((*x.shape[:-1], dims[0]))


try:  # (triton is optional: without it 4-bit layers run the torch reference)
    from .triton_q4 import UNPACK_TENSORS as Q4_UNPACK_TENSORS
    from .triton_q4 import unpack_q4_kernel as _unpack_q4_kernel
except Exception:  # pragma: no cover - depends on the environment
    _unpack_q4_kernel, Q4_UNPACK_TENSORS = None, ()


def _check_counts_unpack_q4(tensors: list[torch.Tensor], dims: list[int]) -> None:
    if len(tensors) != len(Q4_UNPACK_TENSORS) or len(dims) != 5:
        raise ValueError(f"tilesparse::hybrid_unpack_q4 takes {len(Q4_UNPACK_TENSORS)} packed tensors and 5 "
                         f"dimensions, got {len(tensors)} and {len(dims)}")


def _hybrid_unpack_q4(x: torch.Tensor, packed: list[torch.Tensor], dims: list[int]) -> torch.Tensor:
    """The 4-bit layer's dequantized masked weight ``[out_features, in_features]`` in ``x``'s dtype and on its
    device, written by ``unpack_q4_kernel``: ``torch.ops.tilesparse.hybrid_unpack_q4``. ``packed``: the kernel's
    tensors (:data:`Q4_UNPACK_TENSORS` order, derived tables included); ``dims``: ``[out_features, in_features,
    tile_rows, tile_cols, group_size]``. A Triton operator, so that a compiled prefill launches the kernel itself
    (``HybridLinearQ4`` above 16 tokens); under Triton's CPU interpreter an opaque custom operator."""
    from .triton_q4 import unpack_q4_launch

    _check_counts_unpack_q4(packed, dims)
    out = torch.empty(dims[0], dims[1], dtype=x.dtype, device=x.device)
    grid, args, consts = unpack_q4_launch(out, dict(zip(Q4_UNPACK_TENSORS, packed)), *dims)
    torch.library.wrap_triton(_unpack_q4_kernel)[grid](*args, **consts)
    return out


def _hybrid_unpack_q4_fake(x, packed, dims):
    _check_counts_unpack_q4(packed, dims)
    return x.new_empty(dims[0], dims[1])


hybrid_unpack_q4_op = _triton_operator("hybrid_unpack_q4", _hybrid_unpack_q4, _unpack_q4_kernel,
                                       _hybrid_unpack_q4_fake)


__all__ = [
    "OP_TENSORS",
    "Q4_UNPACK_TENSORS",
    "hybrid_linear_op",
    "hybrid_linear_q4_op",
    "hybrid_unpack_op",
    "hybrid_unpack_q4_op",
    "op_tensors",
    "q4_kernel_applies",
    "q4_linear",
    "q4_mma_applies",
    "q4_unpack_applies",
    "q4_unpack_tile_fits",
    "register_layer",
    "register_layer_q4",
]
