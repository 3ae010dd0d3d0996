"""GPTQ (Frantar et al., 2023) with a fixed sparsity mask, as a pure function of one weight and its Hessian.

The SparseGPT paper's joint sparsify + quantize with the mask held fixed: the columns of ``W[out, in]`` are
visited in order, in lazy blocks of ``blocksize`` columns (the structure of
:func:`~tilesparse.pruning.sparsegpt.sparsegpt_prune`). Column ``j`` is replaced by its quantized value
(kept weights) or by 0 (pruned weights), and the error ``(w - q) / [U]_jj`` is propagated to the columns
not yet visited through the upper Cholesky factor ``U`` of the damped inverse Hessian
(:func:`~tilesparse.pruning.sparsegpt.inverse_hessian_cholesky`, which owns the damping). Pass the masked
weight to compensate the quantization error only; an unmasked one also gets the pruning error compensated.

A group's scale and zero point are taken when its first column is reached, from the kept weights of the
group as the earlier columns' updates left them (the lazy blocks are cut so that a group starting inside a
block also ends inside it: its columns are then up to date). With ``act_order`` the columns are visited by
decreasing Hessian diagonal (the inputs with the most energy first, GPTQ's "act-order"); a group's columns are
then scattered over the visit, so every group's scale and zero point are fixed before it starts, from the
weight as given ("static groups"). The result is on the same grid as
:func:`~tilesparse.quant.rtn.quantize_rtn` (bfloat16 scales, exact dequantization, pruned weights exactly 0).
"""

from __future__ import annotations

import math
import warnings

import torch

from ..pruning.sparsegpt import SparseGPTWarning, inverse_hessian_cholesky
from .rtn import QuantizedTensor, QuantResult, _checked, dequantize, group_params, n_groups, quantize_codes, quantize_rtn


def _block_end(i1: int, blocksize: int, group_size: int, cols: int) -> int:
    """End of the lazy block starting at ``i1``: ``i1 + blocksize``, cut before any group that would start
    inside the block and end after it."""
    i2 = min(i1 + blocksize, cols)
    c = (i1 // group_size + 1) * group_size
    while c < i2:
        if min(c + group_size, cols) > i2:
            return c
        c += group_size
    return i2


@torch.no_grad()
def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    observer: str = "minmax",
    act_order: bool = False,
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "layer",
) -> QuantResult:
    """Quantize ``weight [out, in]`` group-wise with GPTQ given its input Hessian ``[in, in]``
    (``sum_t x_t x_t^T``), holding the keep-mask ``keep`` (``None``: dense) fixed.

    Returns the dequantized weight (float32, exactly ``scale * (code - zero)``, 0 where pruned) with its
    codes, bfloat16 scales and zero points, the damping used and the OBS error estimate. ``observer`` chooses
    each group's range (:func:`~tilesparse.quant.rtn.group_params`); ``act_order`` visits the columns by
    decreasing Hessian diagonal with static groups (module docstring). When no usable
    inverse Hessian exists (see :func:`~tilesparse.pruning.sparsegpt.inverse_hessian_cholesky`) the weight is
    rounded to nearest instead (``fallback=True``). The inputs are not modified.
    """
    W, keep = _checked(weight, keep, bits, group_size)
    W = W.clone()
    out, cols = W.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match in={cols}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    g_total = n_groups(cols, group_size)
    scales = torch.ones(out, g_total, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(out, g_total, dtype=torch.float32, device=W.device)
    perm, W_in, keep_in = None, W, keep
    if act_order:  # static groups from the weight as given, then the columns by decreasing Hessian diagonal
        for g in range(g_total):
            c, ce = g * group_size, min((g + 1) * group_size, cols)
            scales[:, g], zeros[:, g] = group_params(W[:, c:ce], keep[:, c:ce], bits, symmetric, observer)
        perm = torch.argsort(torch.diagonal(hessian).to(W.device), descending=True, stable=True)
        hessian = hessian[perm][:, perm]
        W, keep = W[:, perm], keep[:, perm]
    U, used = inverse_hessian_cholesky(hessian, damp, name=name)
    if U is None:
        return _fallback(W_in * keep_in, keep_in, bits, group_size, symmetric, observer)
    U = U.to(device=W.device, dtype=torch.float32)

    col_group = (perm if perm is not None else torch.arange(cols, device=W.device)) // group_size
    codes = torch.empty(out, cols, dtype=torch.uint8, device=W.device)
    total_err = torch.zeros((), dtype=torch.float64, device=W.device)
    s = z = None
    i1 = 0
    while i1 < cols:
        i2 = min(i1 + blocksize, cols) if act_order else _block_end(i1, blocksize, group_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)
        for i in range(i2 - i1):
            c = i1 + i
            if act_order:
                g = int(col_group[c])
                s, z = scales[:, g], zeros[:, g]
            elif c % group_size == 0:
                g, ce = c // group_size, min(c + group_size, cols)
                # a group reaching past this block starts at its first column, where W and W1 agree
                vals = W1[:, i:i + ce - c] if ce <= i2 else W[:, c:ce]
                s, z = group_params(vals, keep[:, c:ce], bits, symmetric, observer)
                scales[:, g], zeros[:, g] = s, z
            w = W1[:, i]
            q = quantize_codes(w, s, z, keep[:, c], bits)
            deq = s * (q - z)
            err = (w - deq) / d1[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            W1[:, i] = deq
            codes[:, c] = q.to(torch.uint8)
            Err1[:, i] = err
        total_err += Err1.double().pow(2).sum() / 2
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        i1 = i2
    if perm is not None:  # back to the layer's column order
        inv = torch.argsort(perm)
        W, codes, keep = W[:, inv], codes[:, inv], keep_in
    if not torch.isfinite(W).all():
        warnings.warn(f"{name}: GPTQ produced non-finite weights; falling back to round-to-nearest",
                      SparseGPTWarning, stacklevel=2)
        return _fallback(weight.detach().float() * keep, keep, bits, group_size, symmetric, observer)
    qt = QuantizedTensor(codes, scales.to(torch.bfloat16), zeros.to(torch.bfloat16), bits, group_size, symmetric)
    return QuantResult(weight=dequantize(qt.codes, qt.scales, qt.zeros, group_size), quantized=qt, damp=used,
                       error=float(total_err))


def _fallback(W: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int, symmetric: bool, observer: str
              ) -> QuantResult:
    res = quantize_rtn(W, keep, bits=bits, group_size=group_size, symmetric=symmetric, observer=observer)
    res.damp, res.fallback = math.inf, True
    return res


__all__ = ["quantize_gptq"]
