"""``HybridLinearQ4``: a drop-in ``nn.Linear`` replacement holding a 4-bit packed hybrid weight
(:mod:`.format_q4`), and model conversion from a mask and a 4-bit quantization. Its product is
:func:`.library.q4_linear`: on CUDA for 1-16 bfloat16/float16 tokens the sparse-tensor-core kernel of
:mod:`.cuda_mma_q4` where it applies, else the Triton decode kernel (:mod:`.triton_q4`); for more tokens the
weight dequantized on the GPU (``triton_q4.unpack_q4_kernel``) and ``F.linear``; the torch reference (dequantize,
then ``F.linear``) otherwise."""

from __future__ import annotations

import torch
from torch import nn

from ..settings import setting
from .format_q4 import PackedHybridQ4, pack_q4
from .library import (Q4_KERNEL_DTYPES, Q4_KERNEL_MAX_TOKENS, Q4_UNPACK_TENSORS, hybrid_linear_q4_op,
                      hybrid_unpack_q4_op, q4_linear, q4_unpack_tile_fits, register_layer_q4)
from .ops import interpreting

_DERIVED = ("row_info", "q4_info", "tile_slot")  # the layout tables, kept as non-persistent buffers


class HybridLinearQ4(nn.Module):
    """``y = x @ W^T + b`` with ``W`` the dequantized masked weight, stored as 4-bit codes in the packed hybrid
    layout (dense tiles: every code; 2:4 tiles: the kept half and the 2:4 metadata; bfloat16 scales and uint8
    zero points per row and group of input columns).

    The packed tensors are registered buffers under ``packed_<name>`` (they follow ``.to()``; ``.half()`` and
    friends leave them alone: codes, metadata and scales keep their types). The product runs in the input's
    dtype, see :func:`.library.q4_linear`: on CUDA with bfloat16/float16 inputs of 1-16 tokens through a decode
    kernel (the codes are read packed and dequantized in registers), of more tokens through ``F.linear`` on the
    weight dequantized on the GPU into a shared scratch buffer; otherwise (the CPU) through the torch reference,
    which dequantizes the whole weight on each call (this layer then saves memory, not time). Under
    ``torch.compile`` it is one ``torch.ops.tilesparse.hybrid_linear_q4`` node, except for CUDA inputs of more than
    16 tokens: ``F.linear`` on ``torch.ops.tilesparse.hybrid_unpack_q4`` (unless ``TILESPARSE_COMPILED_UNPACK=0``),
    whose kernel the compiler launches itself. The layout tables that kernel reads (``row_info``, ``q4_info``,
    ``tile_slot``) are non-persistent buffers ``packed_<name>``: not saved, rebuilt from the tile map.
    """

    def __init__(self, packed: PackedHybridQ4, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.tile = (packed.tile_rows, packed.tile_cols)
        self.group_size = packed.group_size
        for name, t in packed.stored_tensors().items():
            self.register_buffer(f"packed_{name}", t)
        for name in _DERIVED:
            self.register_buffer(f"packed_{name}", getattr(packed, name), persistent=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dims = [self.out_features, self.in_features, *self.tile, self.group_size]
        self._packed_cache = packed
        self._unpack_in_graph = self._unpack_route()
        register_layer_q4(packed)

    def _unpack_route(self) -> bool:
        """Whether compiled graphs run more than 16 tokens as ``F.linear`` on ``tilesparse::hybrid_unpack_q4``
        (read when the layer is built or moved)."""
        return hybrid_unpack_q4_op is not None and setting("compiled_unpack") and q4_unpack_tile_fits(self.tile[1])

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantized, tile_kinds: torch.Tensor, mask24: torch.Tensor | None,
                    tile: tuple[int, int] = (128, 128)) -> HybridLinearQ4:
        """Pack ``quantized`` (a 4-bit :class:`~tilesparse.quant.QuantizedTensor` of ``linear``'s weight) under
        the tile map and 2:4 mask (see :func:`~.format_q4.pack_q4`); the bias is ``linear``'s."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        if tuple(quantized.codes.shape) != tuple(linear.weight.shape):
            raise ValueError(f"codes of shape {tuple(quantized.codes.shape)} do not match the weight "
                             f"{tuple(linear.weight.shape)}")
        return cls(pack_q4(quantized, tile_kinds, mask24, tile), linear.bias)

    def _tensors(self) -> list[torch.Tensor]:
        return [self._buffers[f"packed_{name}"] for name in PackedHybridQ4.STORED]

    @property
    def packed(self) -> PackedHybridQ4:
        """The layer's :class:`PackedHybridQ4` over the module's buffers (rebuilt when they change)."""
        ts = self._tensors()
        c = self._packed_cache
        if c is None or any(getattr(c, n) is not t for n, t in zip(PackedHybridQ4.STORED, ts)):
            c = PackedHybridQ4(*self._dims, **dict(zip(PackedHybridQ4.STORED, ts)))
            self._packed_cache = c
            for name in _DERIVED:  # (the tables of the tensors now held; same values unless the tile map changed)
                self._buffers[f"packed_{name}"] = getattr(c, name)
            register_layer_q4(c)
        return c

    def __setstate__(self, state):
        # a copy (copy.deepcopy, pickle) gets its own packed view over its own buffers
        super().__setstate__(state)
        self._packed_cache = None
        if not self._buffers["packed_scales"].is_meta:
            self.packed  # noqa: B018

    def _apply(self, fn, recurse=True):
        scales = self._buffers["packed_scales"]
        out = super()._apply(fn, recurse)
        moved = self._buffers["packed_scales"]
        if moved.dtype != scales.dtype:  # a dtype cast of the model: scales stay bfloat16 (only the device moves)
            self._buffers["packed_scales"] = scales.to(moved.device)
        if not moved.is_meta:
            self.packed  # noqa: B018 -- new buffers: rebuild and register the view now, not inside a traced forward
        self._unpack_in_graph = self._unpack_route()
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized masked weight (float32; for inspection, not for the forward pass)."""
        return self.packed.unpack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, the layer expects in_features="
                             f"{self.in_features}")
        if torch.compiler.is_compiling():
            if (self._unpack_in_graph and x.dtype in Q4_KERNEL_DTYPES and (x.is_cuda or interpreting())
                    and x.numel() > Q4_KERNEL_MAX_TOKENS * self.in_features):
                w = hybrid_unpack_q4_op(x, [self._buffers[f"packed_{n}"] for n in Q4_UNPACK_TENSORS], self._dims)
                return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
            return hybrid_linear_q4_op(x, self._tensors(), self.bias, self._dims)
        return q4_linear(x, self.packed, self.bias)

    def nbytes(self) -> int:
        """Resident bytes of the packed weight (+ bias)."""
        b = self.packed.nbytes()
        return b + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tile={self.tile[0]}x{self.tile[1]}, 4-bit, group={self.group_size}")


def convert_model_q4(model: nn.Module, layers: dict[str, tuple], tile: tuple[int, int] = (128, 128)) -> nn.Module:
    """Replace every ``nn.Linear`` named in ``layers`` (module name -> ``(quantized, tile_kinds, mask24)``,
    see :meth:`HybridLinearQ4.from_linear`) by a :class:`HybridLinearQ4`; in place, returns ``model``."""
    from .linear import _set_submodule

    names = dict(model.named_modules())
    missing = [n for n in layers if n not in names]
    if missing:
        raise ValueError(f"4-bit layers name modules the model does not have: {missing[:3]}")
    for name, (quantized, kinds, mask24) in layers.items():
        lin = names[name]
        try:
            new = HybridLinearQ4.from_linear(lin, quantized, kinds, mask24, tile)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
        _set_submodule(model, name, new.to(lin.weight.device))
    return model


__all__ = ["HybridLinearQ4", "convert_model_q4"]
