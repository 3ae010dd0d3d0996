"""Group-wise weight-only quantization, rounding to nearest (pure tensor math: no model, no I/O).

Layout: a weight ``W[out, in]`` is cut along ``in`` into groups of ``group_size`` columns (the last group
is shorter when ``group_size`` does not divide ``in``). Every (row, group) has one scale and one zero point,
both stored in bfloat16; a code is an unsigned integer in ``[0, 2**bits - 1]`` and stands for the weight
``scale * (code - zero)``.

- Symmetric (GPTQ's convention): ``zero = 2**(bits-1)``, ``scale = 2 * absmax / (2**bits - 1)``.
- Asymmetric: the range ``[min(w, 0), max(w, 0)]`` of the group, ``scale = (max - min) / (2**bits - 1)``,
  ``zero = round(-min / scale)`` (an integer, exact in bfloat16).

Observers (how a group's range is chosen): ``minmax`` takes it as above; ``mse`` also tries the range shrunk
by the factors of :data:`MSE_SHRINKS` and keeps, per group, the one whose rounded weights have the smallest
``sum |w - q| ** 2.4`` over the kept weights (the search of the GPTQ reference code, whose exponent this is).
Shrinking clips the outliers of a group to round its other weights more finely.

Sparsity comes first: with a keep-mask, pruned weights get ``code == zero`` (exactly 0 after
dequantization) and take no part in their group's range, so a 2:4 group's scale is set by its kept
weights only. Scales are rounded *up* to the next bfloat16 value and the codes are computed with the
rounded scale: ``scale * (code - zero)`` in float32 is then exact (8 significant bits times a small
integer) and reproduces the quantized weights, and no kept weight moves by more than ``scale / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..options import QUANT_BITS

MSE_SHRINKS: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(41))  # 1.00, 0.98, ..., 0.20
MSE_NORM = 2.4


@dataclass
class QuantizedTensor:
    """The integer form of one weight ``[out, in]``: what a packed 4-bit format stores."""

    codes: torch.Tensor  # uint8 [out, in], in [0, 2**bits - 1]; == zero where pruned
    scales: torch.Tensor  # bfloat16 [out, n_groups], > 0
    zeros: torch.Tensor  # bfloat16 [out, n_groups], integers in [0, 2**bits - 1]
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        """The weight ``scale * (code - zero)`` as float32 ``[out, in]`` (exact)."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)


@dataclass
class QuantResult:
    """Outcome of :func:`quantize_rtn` or :func:`~tilesparse.quant.gptq.quantize_gptq` for one weight."""

    weight: torch.Tensor  # float32 [out, in]: exactly quantized.dequantize(), 0 where pruned
    quantized: QuantizedTensor
    damp: float = 0.0  # GPTQ: relative damping used (inf when the Hessian was unusable)
    fallback: bool = False  # GPTQ: True when it fell back to round-to-nearest
    error: float = math.nan  # GPTQ: OBS estimate of the added loss, sum (w - q)^2 / [H^-1]_jj^2 / 2

    @property
    def codes(self) -> torch.Tensor:
        return self.quantized.codes

    @property
    def scales(self) -> torch.Tensor:
        return self.quantized.scales

    @property
    def zeros(self) -> torch.Tensor:
        return self.quantized.zeros


def check_quant_args(bits: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is supported and ``group_size`` positive."""
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, QUANT_BITS))}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group size must be a positive integer, got {group_size!r}")


def n_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups along ``in`` (the last one may be partial)."""
    return math.ceil(in_features / group_size)


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values ``>= x`` (positive float32 ``x``), as float32."""
    b = x.to(torch.bfloat16)
    up = torch.nextafter(b, torch.full_like(b, math.inf))
    return torch.where(b.float() < x, up, b).float()


def group_params(values: torch.Tensor, keep: torch.Tensor, bits: int, symmetric: bool, observer: str = "minmax",
                 *, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of groups along the last dimension of ``values``, from the kept entries only.

    Returns float32 tensors of shape ``values.shape[:-1]`` holding bfloat16-representable values: the scale
    (rounded up to bfloat16; 1 for a group with no kept nonzero weight) and the integer zero point.
    ``observer`` is ``minmax`` (the kept range, times ``shrink``) or ``mse`` (the best of the shrunk ranges,
    module docstring).
    """
    if observer == "mse":
        return _mse_params(values, keep, bits, symmetric)
    if observer != "minmax":
        raise ValueError(f"observer must be minmax or mse, got {observer!r}")
    maxq = 2 ** bits - 1
    v = torch.where(keep, values.float(), torch.zeros((), dtype=torch.float32, device=values.device)) * shrink
    if symmetric:
        absmax = v.abs().amax(-1)
        scale = 2.0 * absmax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        hi = v.amax(-1).clamp(min=0.0)
        lo = v.amin(-1).clamp(max=0.0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _bf16_ceil(scale)
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _mse_params(values: torch.Tensor, keep: torch.Tensor, bits: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.where(keep, values.float(), torch.zeros((), dtype=torch.float32, device=values.device))
    best_s = best_z = best_err = None
    for shrink in MSE_SHRINKS:
        s, z = group_params(v, keep, bits, symmetric, shrink=shrink)
        q = quantize_codes(v, s[..., None], z[..., None], keep, bits)
        err = (v - s[..., None] * (q - z[..., None])).abs().pow(MSE_NORM).sum(-1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    return best_s, best_z


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, keep: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Codes (float32 integers in ``[0, 2**bits - 1]``) of ``values`` for broadcastable ``scale``/``zero``;
    pruned entries (``keep`` False) get the zero point, i.e. dequantize to exactly 0."""
    q = torch.clamp(torch.round(values.float() / scale) + zero, 0, 2 ** bits - 1)
    return torch.where(keep, q, zero.expand_as(q))


def _per_column(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scale * (code - zero)`` per weight, float32 ``[out, in]``, for per-group ``scales``/``zeros``
    ``[out, n_groups]`` (exact: a bfloat16 scale times an integer below 2**9 fits float32)."""
    out, cols = codes.shape
    if tuple(scales.shape) != (out, n_groups(cols, group_size)) or scales.shape != zeros.shape:
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit codes "
                         f"{tuple(codes.shape)} with group size {group_size}")
    return _per_column(scales, group_size, cols) * (codes.float() - _per_column(zeros, group_size, cols))


def _checked(weight: torch.Tensor, keep: torch.Tensor | None, bits: int, group_size: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    check_quant_args(bits, group_size)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    W = weight.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise ValueError("weight has non-finite entries")
    if keep is None:
        keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    elif tuple(keep.shape) != tuple(W.shape):
        raise ValueError(f"keep-mask of shape {tuple(keep.shape)} does not match the weight {tuple(W.shape)}")
    return W, keep.to(device=W.device, dtype=torch.bool)


@torch.no_grad()
def quantize_rtn(weight: torch.Tensor, keep: torch.Tensor | None = None, *, bits: int = 4, group_size: int = 128,
                 symmetric: bool = True, observer: str = "minmax") -> QuantResult:
    """Round every kept weight of ``weight [out, in]`` to the nearest point of its group's grid.

    ``keep`` is the ``[out, in]`` boolean keep-mask (``None``: dense). Pruned weights become exactly 0 and do
    not influence their group's scale or zero point. Returns the dequantized weight (float32) and its codes,
    bfloat16 scales and zero points. With the ``minmax`` observer every kept weight moves by at most half its
    group's scale; ``mse`` may clip a group's largest weights to round the others more finely.
    """
    W, keep = _checked(weight, keep, bits, group_size)
    out, cols = W.shape
    g = n_groups(cols, group_size)
    pad = g * group_size - cols
    Wp = torch.nn.functional.pad(W, (0, pad)).reshape(out, g, group_size)
    Kp = torch.nn.functional.pad(keep, (0, pad), value=False).reshape(out, g, group_size)
    scale, zero = group_params(Wp, Kp, bits, symmetric, observer)
    codes = quantize_codes(Wp, scale[..., None], zero[..., None], Kp, bits).reshape(out, -1)[:, :cols]
    qt = QuantizedTensor(codes.to(torch.uint8), scale.to(torch.bfloat16), zero.to(torch.bfloat16), bits,
                         group_size, symmetric)
    return QuantResult(weight=qt.dequantize(), quantized=qt)


__all__ = ["QuantizedTensor", "QuantResult", "check_quant_args", "n_groups", "group_params", "quantize_codes",
           "dequantize", "quantize_rtn", "MSE_SHRINKS"]
