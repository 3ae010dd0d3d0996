"""Find the decoder blocks of any HF causal LM and the prunable linear layers inside them.

Discovery is by module type, not by attribute paths: the decoder stack is the ``nn.ModuleList`` of
identically-typed blocks that holds the most linear-layer parameters. Linear layers are
``nn.Linear`` and GPT-2's ``Conv1D`` (which stores its weight transposed, ``[in, out]``).
Embeddings and ``lm_head`` live outside the blocks and are never returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TilesparseError

try:  # GPT-2 style layers
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment]

_LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2 ``Conv1D`` modules."""
    return isinstance(module, _LINEAR_TYPES)


@dataclass
class PrunableLinear:
    """A linear layer inside a decoder block.

    ``name`` is the full module name in the model (usable with ``model.get_submodule``);
    ``short_name`` the name inside its block (``self_attn.q_proj``). Shapes follow ``W[out, in]``.
    """

    name: str
    short_name: str
    block_index: int
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """True when the module stores ``[in, out]`` (GPT-2 ``Conv1D``)."""
        return not isinstance(self.module, nn.Linear)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view for transposed layers)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @torch.no_grad()
    def set_weight(self, w_oi: torch.Tensor) -> None:
        """Overwrite the weight from an ``[out, in]`` tensor (keeps dtype and device)."""
        target = self.module.weight
        src = w_oi.t() if self.transposed else w_oi
        target.copy_(src.to(device=target.device, dtype=target.dtype))

    @torch.no_grad()
    def apply_mask(self, mask_oi: torch.Tensor) -> None:
        """Zero the weights where the ``[out, in]`` keep-mask is False."""
        m = mask_oi.to(self.module.weight.device).bool()
        self.module.weight.mul_((m.t() if self.transposed else m).to(self.module.weight.dtype))


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if is_linear(m))


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, blocks)``: the model's stack of decoder blocks.

    Raises :class:`TilesparseError` when the model has no list of repeated blocks holding linears.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(child) for child in mod}
        if len(kinds) != 1:
            continue
        n = sum(_linear_params(child) for child in mod)
        if n and (best is None or n > best[0]):
            best = (n, name, mod)
    if best is None:
        raise TilesparseError(
            f"{type(model).__name__}: no decoder blocks with linear layers found (unsupported architecture)"
        )
    return best[1], best[2]


def find_prunable_linears(model: nn.Module) -> list[PrunableLinear]:
    """All linear layers inside the decoder blocks, in block order then module order."""
    stack_name, blocks = find_decoder_blocks(model)
    out: list[PrunableLinear] = []
    for i, block in enumerate(blocks):
        for short, mod in block.named_modules():
            if is_linear(mod):
                full = f"{stack_name}.{i}.{short}" if stack_name else f"{i}.{short}"
                out.append(PrunableLinear(full, short, i, mod))
    if not out:
        raise TilesparseError(f"{type(model).__name__}: decoder blocks contain no linear layers")
    return out
