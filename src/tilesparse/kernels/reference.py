"""Reference (plain torch) implementation of ``Y = X @ W^T + b`` for a packed hybrid layer.

Used on CPU, as the fallback where the Triton kernels cannot run, and as the oracle in tests.
"""

from __future__ import annotations

import torch

from .format import PackedHybrid, unpack


def reference_linear(x: torch.Tensor, packed: PackedHybrid, bias: torch.Tensor | None = None,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W*M, bias)`` in ``x``'s dtype, exactly what ``nn.Linear`` with the masked weight gives.

    ``weight`` may pass an already unpacked weight (to skip unpacking).
    """
    w = unpack(packed) if weight is None else weight
    return torch.nn.functional.linear(x, w.to(device=x.device, dtype=x.dtype),
                                      None if bias is None else bias.to(device=x.device, dtype=x.dtype))


def reference_linear_f64(x: torch.Tensor, packed: PackedHybrid, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in float64 on the CPU (the accuracy oracle)."""
    w = unpack(packed).cpu().double()
    b = None if bias is None else bias.detach().cpu().double()
    return torch.nn.functional.linear(x.detach().cpu().double(), w, b)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``inf`` if ``out`` has NaN/Inf)."""
    o = out.detach().cpu().double()
    r = ref.detach().cpu().double()
    if not torch.isfinite(o).all():
        return float("inf")
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 0 else num
