"""Loss terms besides cross-entropy (pure functions).

``loss = CE + l1 * |d(M) - (1 - s)| - l2 * (1 - t/T) * sum_l ||M_l * W_l||_F / sum_l ||W_l||_F``

``d`` is the global numel-weighted density by default; :func:`density_penalty` also takes per-block
densities (the mean of their deviations). Densities come from tile-level values only (see
:func:`tilesparse.learning.relax.expected_tile_density`), either sampled or expected.
"""

from __future__ import annotations

from typing import Sequence

import torch

DENSITY_SCOPES = ("global", "block")
DENSITY_ESTIMATES = ("sampled", "expected")


def density_penalty(densities: torch.Tensor | Sequence[torch.Tensor], target_density: float,
                    weight: float) -> torch.Tensor:
    """``weight * mean_i |d_i - target|`` over one (global) or several (per-block) densities."""
    d = densities if isinstance(densities, torch.Tensor) else torch.stack(list(densities))
    return weight * (d.reshape(-1) - target_density).abs().mean()


def magnitude_decay(step: int, total_steps: int) -> float:
    """The decay factor ``1 - t/T`` of the weight-magnitude regulariser (``t`` 0-based, ``T`` steps)."""
    if total_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / total_steps)


def magnitude_bonus(masked_norms: Sequence[torch.Tensor] | torch.Tensor, total_weight_norm: float,
                    weight: float, step: int, total_steps: int) -> torch.Tensor:
    """``-weight * (1 - t/T) * sum ||M*W||_F / sum ||W||_F`` (negative: it rewards keeping large weights)."""
    s = masked_norms if isinstance(masked_norms, torch.Tensor) else torch.stack(list(masked_norms)).sum()
    return -weight * magnitude_decay(step, total_steps) * s / total_weight_norm


__all__ = ["DENSITY_SCOPES", "DENSITY_ESTIMATES", "density_penalty", "magnitude_decay", "magnitude_bonus"]
