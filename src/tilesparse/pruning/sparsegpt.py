"""SparseGPT (Frantar & Alistarh, 2023) as a pure function of one weight matrix and its Hessian.

Given ``W[out, in]`` and the layer's input Hessian ``H = sum_t x_t x_t^T`` (``[in, in]``), prune column by
column with the Optimal Brain Surgeon update, in lazy blocks of ``blocksize`` columns, choosing the
mask adaptively from ``w^2 / [H^-1]_jj^2`` on the already-updated weights:

- ``unstructured``: in every block, the ``round(s * out * blocksize)`` lowest scores (the paper's rule);
- ``2:4``: in every group of 4 columns, the two lowest scores of each row;
- ``hybrid``: 2:4 inside the tiles marked SPARSE, nothing inside DENSE tiles, everything inside ZERO
  tiles (errors of dense tiles' neighbours still flow into them through the update);
- a fixed ``mask``: only the update (reconstruct the weights for a given keep-mask).

Numerically robust: the Hessian is damped by ``damp * mean(diag H)``; when its Cholesky factorisation
fails the damping grows tenfold (with a warning) and, as a last resort, the identity is used (plain
magnitude selection, no update). Non-finite results never leave this function.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..masks.tiles import SPARSE, ZERO, TileGrid


class SparseGPTWarning(UserWarning):
    """The Hessian needed more damping than asked, or SparseGPT fell back to magnitude."""


@dataclass
class SparseGPTResult:
    """Outcome of :func:`sparsegpt_prune` for one layer."""

    weight: torch.Tensor  # [out, in] float32, pruned (zeros where not kept) and updated
    keep: torch.Tensor  # [out, in] bool
    damp: float  # relative damping actually used (inf when the identity fallback was used)
    fallback: bool  # True when no usable inverse Hessian existed (magnitude selection, no update)
    error: float  # OBS estimate of the added loss, sum (w - q)^2 / [H^-1]_jj^2 / 2


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = 0.01, *, max_tries: int = 6,
                             name: str = "layer") -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float64, growing damping on failure.

    Dead inputs (exactly zero diagonal) get a unit diagonal. Returns ``(U, damp_used)``, or ``(None, inf)`` when
    even ``damp * 10**(max_tries-1)`` fails or the Hessian is not finite (a warning says so).
    """
    H = hessian.detach().to(torch.float64).clone()
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        warnings.warn(f"{name}: Hessian has non-finite entries; falling back to magnitude selection",
                      SparseGPTWarning, stacklevel=2)
        return None, math.inf
    H = 0.5 * (H + H.T)
    diag = torch.diagonal(H)
    dead = diag == 0
    if dead.any():
        H[dead, :] = 0
        H[:, dead] = 0
        diag[dead] = 1.0
    mean_diag = float(diag.mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for attempt in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + (d * mean_diag) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(U).all() and bool((torch.diagonal(U) > 0).all()):
                if attempt:
                    warnings.warn(f"{name}: Hessian not positive definite at damping {damp:g}; "
                                  f"used {d:g}", SparseGPTWarning, stacklevel=2)
                return U, d
        d *= 10.0
    warnings.warn(f"{name}: Hessian not positive definite even at damping {d / 10:g}; "
                  "falling back to magnitude selection without weight update", SparseGPTWarning, stacklevel=2)
    return None, math.inf


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (True = prune) of the ``k`` lowest entries of ``scores`` (exact count)."""
    flat = scores.reshape(-1)
    prune = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        prune[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    return prune.reshape(scores.shape)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    pattern: str = "2:4",
    sparsity: float = 0.5,
    kinds: torch.Tensor | None = None,
    tile: tuple[int, int] = (128, 128),
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "layer",
) -> SparseGPTResult:
    """Prune one weight ``[out, in]`` with SparseGPT given its input Hessian ``[in, in]``.

    ``pattern`` is ``unstructured`` (uses ``sparsity``), ``2:4``, ``hybrid`` (needs the tile map
    ``kinds`` for tiles of size ``tile``) or ``fixed`` (needs a keep-``mask``). Returns the pruned
    and updated weight and its keep-mask; the inputs are not modified.
    """
    W = weight.detach().to(torch.float32).clone()
    out, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match in={cols}")
    if blocksize <= 0 or blocksize % 4:
        raise ValueError(f"blocksize must be a positive multiple of 4, got {blocksize}")
    grouped = pattern in ("2:4", "hybrid")
    if grouped and cols % 4:
        raise ValueError(f"{name}: in={cols} is not a multiple of 4; cannot be 2:4")
    if pattern == "unstructured" and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"unstructured sparsity must lie in [0, 1), got {sparsity}")
    rows_kind = None
    if pattern == "hybrid":
        if kinds is None:
            raise ValueError("hybrid pattern needs tile kinds")
        rows_kind = TileGrid(out, cols, *tile).expand(kinds.to(device=W.device, dtype=torch.int8))  # [out, in]
    elif pattern == "fixed":
        if mask is None or tuple(mask.shape) != (out, cols):
            raise ValueError(f"{name}: fixed pattern needs a keep-mask of shape {(out, cols)}")
    elif pattern not in ("unstructured", "2:4"):
        raise ValueError(f"unknown pattern {pattern!r}")

    U, used = inverse_hessian_cholesky(hessian, damp, name=name)
    if U is None:
        return _fallback(W, pattern, sparsity, rows_kind, mask, used)
    dead = torch.diagonal(hessian) == 0
    if dead.any():
        W[:, dead.to(W.device)] = 0  # inputs never seen: these weights do not matter, prune them first
    U = U.to(device=W.device, dtype=torch.float32)

    prune = torch.zeros(out, cols, dtype=torch.bool, device=W.device)
    total_err = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)
        inv_d1 = 1.0 / d1
        if pattern == "unstructured":
            P1 = _lowest_k(W1 ** 2 / d1[None, :] ** 2, int(round(sparsity * W1.numel())))
        elif pattern == "fixed":
            P1 = ~mask[:, i1:i2].to(device=W.device, dtype=torch.bool)
        else:
            P1 = torch.zeros_like(W1, dtype=torch.bool)
        # err_i = (w_i - q_i) / d_i = w_i * [pruned] / d_i: a per-entry factor, computed per group or block
        F1 = P1.to(W1.dtype) * inv_d1[None, :] if not grouped else torch.empty_like(W1)
        for i in range(count):
            if grouped and i % 4 == 0:
                sc = W1[:, i:i + 4] ** 2 / d1[None, i:i + 4] ** 2
                idx = torch.topk(sc, 2, dim=1, largest=False).indices
                g = torch.zeros(out, 4, dtype=torch.bool, device=W.device).scatter_(1, idx, True)
                if rows_kind is not None:
                    k = rows_kind[:, i1 + i]
                    g = (g & (k == SPARSE)[:, None]) | (k == ZERO)[:, None]
                P1[:, i:i + 4] = g
                torch.mul(g.to(W1.dtype), inv_d1[None, i:i + 4], out=F1[:, i:i + 4])
            err = W1[:, i] * F1[:, i]
            # OBS update of the remaining columns of the block; column i itself becomes q_i (0 where pruned)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W1.masked_fill_(P1, 0.0)  # exact zeros where pruned (the update leaves rounding residue)
        total_err += Err1.double().pow(2).sum() / 2
        W[:, i1:i2] = W1
        prune[:, i1:i2] = P1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if not torch.isfinite(W).all():
        warnings.warn(f"{name}: SparseGPT produced non-finite weights; falling back to magnitude selection",
                      SparseGPTWarning, stacklevel=2)
        return _fallback(weight.detach().to(torch.float32).clone(), pattern, sparsity, rows_kind, mask, math.inf)
    return SparseGPTResult(weight=W, keep=~prune, damp=used, fallback=False, error=float(total_err))


def _fallback(W: torch.Tensor, pattern: str, sparsity: float, rows_kind, mask, used: float) -> SparseGPTResult:
    """Magnitude selection in the same pattern, no weight update (identity Hessian)."""
    from .scores import select_unstructured
    from ..masks.nm import topk_mask

    W = torch.nan_to_num(W, nan=0.0, posinf=0.0, neginf=0.0)
    score = W.abs()
    if pattern == "unstructured":
        keep = select_unstructured(score, sparsity, "layer")
    elif pattern == "fixed":
        keep = mask.to(torch.bool)
    else:
        keep = topk_mask(score)
        if rows_kind is not None:
            keep = torch.where(rows_kind == SPARSE, keep, rows_kind != ZERO)
    return SparseGPTResult(weight=W * keep, keep=keep, damp=used, fallback=True, error=float("nan"))
