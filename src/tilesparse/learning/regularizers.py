"""Loss terms (pure functions).

``loss = task + l1 * |d(M) - (1 - s)| - l2 * (1 - t/T) * sum_l ||M_l * W_l||_F / sum_l ||W_l||_F``

where ``task`` is the next-token cross-entropy on the training text (``loss='ce'``), the distillation
loss from the dense model (:func:`distillation_loss`, ``'kd'``) or ``kd + ce_weight * ce`` (``'kd+ce'``).

``d`` is the global numel-weighted density by default; :func:`density_penalty` also takes per-block
densities (the mean of their deviations). Densities come from tile-level values only (see
:func:`tilesparse.learning.relax.expected_tile_density`), either sampled or expected.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..options import DENSITY_ESTIMATES, DENSITY_SCOPES


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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` between the next-token distributions at
    ``temperature`` (scaled by ``temperature**2`` so that gradients keep their size), in float32.

    Logits are ``[..., vocab]``; positions are every leading index."""
    v = student_logits.shape[-1]
    s = torch.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature ** 2


__all__ = ["DENSITY_SCOPES", "DENSITY_ESTIMATES", "distillation_loss", "density_penalty", "magnitude_decay",
           "magnitude_bonus"]
