"""``HybridLinear``: a drop-in ``nn.Linear`` replacement holding a packed hybrid weight, and model conversion."""

from __future__ import annotations

import torch
from torch import nn

from ..settings import setting
from . import ops
from .format import PackedHybrid, pack, pack_from_kinds
from .library import OP_TENSORS, hybrid_linear_op, hybrid_unpack_op, register_layer
from .ops import UNPACK_ABOVE, check_operands, hybrid_linear, interpreting, kernel_supported

_BUFFERS = tuple(f"packed_{name}" for name in OP_TENSORS)


class HybridLinear(nn.Module):
    """``y = x @ (W*M)^T + b`` with ``W*M`` stored in the packed hybrid format.

    The packed tensors are registered buffers (they follow ``.to()``/``.cuda()`` and appear in the
    ``state_dict`` under ``packed.<name>``). On CUDA with 16-bit weights the Triton kernels run; on
    CPU (or for tile sizes/dtypes the kernels do not take) the torch reference runs
    (``F.linear`` on the unpacked weight, exactly what ``nn.Linear`` with the masked weight gives).
    Set ``use_triton`` to force one path (``True`` on CPU needs ``TRITON_INTERPRET=1``).

    Under ``torch.compile`` the layer is one ``torch.ops.tilesparse.hybrid_linear`` node (see
    :mod:`.library`), so models with hybrid layers compile with ``fullgraph=True``; in eager mode the same
    function runs without the operator's dispatch.
    """

    def __init__(self, packed: PackedHybrid, bias: torch.Tensor | None = None, use_triton: bool | None = None):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.tile = (packed.tile_rows, packed.tile_cols)
        self.use_triton = use_triton
        for name, t in packed.stored_tensors().items():
            self.register_buffer(f"packed_{name}", t)
        self.register_buffer("packed_row_info", packed.row_info, persistent=False)
        self.register_buffer("packed_tile_slot", packed.tile_slot, persistent=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(packed.dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._op_dims = [self.out_features, self.in_features, *self.tile]
        self._use(packed)  # the buffers are its tensors: the view the forward uses, laid out already

    # -------------------------------------------------------------- constructors
    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, tile: tuple[int, int] = (128, 128),
                    use_triton: bool | None = None) -> "HybridLinear":
        """Pack ``linear.weight * mask``; every tile of the boolean ``mask`` must be dense, 2:4 or empty."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        p = pack(linear.weight.detach(), mask, tile)
        return cls(p, linear.bias, use_triton)

    @classmethod
    def from_kinds(cls, linear: nn.Linear, tile_kinds: torch.Tensor, mask24: torch.Tensor | None,
                   tile: tuple[int, int] = (128, 128), use_triton: bool | None = None) -> "HybridLinear":
        """Pack from an explicit tile map and 2:4 mask (see :func:`pack_from_kinds`)."""
        p = pack_from_kinds(linear.weight.detach(), tile_kinds, mask24, tile)
        return cls(p, linear.bias, use_triton)

    # -------------------------------------------------------------- packed view
    @property
    def packed(self) -> PackedHybrid:
        """The layer's :class:`PackedHybrid` (views of the module's buffers; rebuilt after ``.to()``)."""
        c = self._packed_cache
        b = self._buffers  # (read directly: this runs on every eager call)
        if c is None or c.dn_vals is not b["packed_dn_vals"] or c.sp_vals is not b["packed_sp_vals"] \
                or c.row_info is not b["packed_row_info"]:
            c = PackedHybrid.__new__(PackedHybrid)
            c.out_features, c.in_features = self.out_features, self.in_features
            c.tile_rows, c.tile_cols = self.tile
            for name in PackedHybrid.STORED:
                setattr(c, name, getattr(self, f"packed_{name}"))
            c.rebuild_layout()
            if c.row_info.device != self.packed_row_info.device or not torch.equal(c.row_info, self.packed_row_info):
                raise ValueError("packed layer: derived layout does not match the stored tensors")
            c.row_info, c.tile_slot = self.packed_row_info, self.packed_tile_slot
            self._use(c)
        return c

    def _use(self, packed: PackedHybrid) -> None:
        """Make ``packed`` (a view of this module's buffers) the layer's packed view: kept for the forward, its
        compiled route decided, registered for the operator."""
        self._packed_cache = packed
        self._graph_route = self._route_in_graph(packed)
        register_layer(packed)

    def __setstate__(self, state):
        # a copy (copy.deepcopy, pickle) gets its own packed view over its own buffers
        super().__setstate__(state)
        self._packed_cache = None
        self.packed  # noqa: B018

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.packed  # noqa: B018 -- new buffers (.to(), .cuda(), .half()): rebuild and register the view
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The masked dense weight (unpacked on demand; for inspection, not for the forward pass)."""
        return self.packed.unpack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        return hybrid_linear(x, self.packed, self._parameters["bias"], use_triton=self.use_triton)

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward as ``torch.compile`` traces it: one ``tilesparse::hybrid_linear`` node, except where the
        Triton kernels take the layer and ``x`` is on CUDA (or on the CPU under Triton's interpreter with
        ``use_triton=True``). There a layer of dense tiles only is ``F.linear`` on its stored values, and (unless
        ``TILESPARSE_COMPILED_UNPACK=0``) more than :data:`.ops.UNPACK_ABOVE` tokens (which the dispatcher
        would unpack anyway) are ``F.linear`` on the ``tilesparse::hybrid_unpack`` operator's output: the
        compiler then launches both kernels itself, at a fraction of the dispatcher's host cost per call (a
        prefill is not replayed from a CUDA graph, so that cost counts)."""
        bufs = [getattr(self, name) for name in _BUFFERS]
        route = self._graph_route
        if route is not None and self.use_triton is not False and (x.is_cuda or self.use_triton and interpreting()):
            check_operands(x, self.bias, self.in_features, self.out_features, self.packed_dn_vals.dtype,
                           self.packed_dn_vals.device)
            if route == "dense":
                return torch.nn.functional.linear(x, self.packed_dn_vals.view(self.out_features, self.in_features),
                                                  self.bias)
            if route == "unpack" and x.numel() > UNPACK_ABOVE * self.in_features:
                return torch.nn.functional.linear(x, hybrid_unpack_op(bufs, self._op_dims), self.bias)
        return hybrid_linear_op(x, bufs, self.bias, self._op_dims,
                                -1 if self.use_triton is None else int(bool(self.use_triton)))

    @staticmethod
    def _route_in_graph(packed: PackedHybrid) -> str | None:
        """How :meth:`_compiled_forward` may run ``packed`` outside the hybrid operator: ``"dense"`` (all tiles
        dense, stored as ``W``), ``"unpack"`` (above :data:`.ops.UNPACK_ABOVE` tokens; unless
        ``TILESPARSE_COMPILED_UNPACK=0``), ``"columns"`` (a column-shared layer the TileLang GEMMs can run: every
        token count through the operator, whose dispatcher chooses between them and unpacking) or ``None`` (the
        hybrid operator: the Triton kernels do not take the layer, or the switch is off)."""
        if hybrid_unpack_op is None or not kernel_supported(packed):
            return None
        if packed.is_plain_dense():
            return "dense"
        if ops.COLUMNS_CANDIDATES and ops.columns_route(packed):
            return "columns"
        return "unpack" if setting("compiled_unpack") else None

    def nbytes(self) -> int:
        """Resident bytes of the packed weight (+ bias)."""
        b = self.packed.nbytes()
        return b + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        k = self.packed.kind_counts()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tile={self.tile[0]}x{self.tile[1]}, tiles 2:4/dense/zero={k['sparse']}/{k['dense']}/{k['zero']}, "
                f"kernel={'triton' if kernel_supported(self.packed) else 'reference'}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_model(model: nn.Module, masks: dict[str, torch.Tensor], tile: tuple[int, int] = (128, 128),
                  use_triton: bool | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` named in ``masks`` (module name -> boolean keep-mask ``[out, in]``)
    by a :class:`HybridLinear` holding ``W * mask`` packed; in place, returns ``model``.

    Every tile of each mask must be dense, exactly 2:4 or empty (``ValueError`` naming the layer and
    tile otherwise). Layers not named are left alone.
    """
    names = dict(model.named_modules())
    missing = [n for n in masks if n not in names]
    if missing:
        raise ValueError(f"masks name modules the model does not have: {missing[:3]}")
    for name, mask in masks.items():
        lin = names[name]
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is a {type(lin).__name__}, not nn.Linear")
        if tuple(mask.shape) != tuple(lin.weight.shape):
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(lin.weight.shape)}")
        try:
            new = HybridLinear.from_linear(lin, mask.to(lin.weight.device), tile, use_triton)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        _set_submodule(model, name, new)
    return model


def hybrid_layers(model: nn.Module) -> dict[str, HybridLinear]:
    """All :class:`HybridLinear` modules of a model by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HybridLinear)}
