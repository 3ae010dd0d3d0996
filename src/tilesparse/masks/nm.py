"""2:4 semi-structured patterns: the six candidates, compact pattern ids, checks.

A *group* is 4 consecutive weights along the input dimension (the last axis of ``W[out, in]``).
A 2:4 group keeps exactly two of its four weights. There are six legal keep-patterns; this module
numbers them 0..5 in the order of :data:`PATTERNS` and converts between boolean masks and ids.

All functions are pure tensor math (no model, no I/O) and work on any leading shape.
"""

from __future__ import annotations

import torch

GROUP = 4
N_PATTERNS = 6
ID_BITS = 3

# Keep-patterns of a group of 4, id = row index. 1 = weight kept.
PATTERNS = torch.tensor(
    [
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 0, 1],
        [0, 1, 1, 0],
        [0, 1, 0, 1],
        [0, 0, 1, 1],
    ],
    dtype=torch.bool,
)

# Lookup from the 4-bit code of a group (bit j = position j kept) to its pattern id, -1 if not 2:4.
_CODE_TO_ID = torch.full((16,), -1, dtype=torch.int64)
for _i, _p in enumerate(PATTERNS.tolist()):
    _CODE_TO_ID[sum(int(b) << j for j, b in enumerate(_p))] = _i
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8], dtype=torch.int64)


class NotTwoFourError(ValueError):
    """A mask that claims to be 2:4 has a group that does not keep exactly two of four."""


def _groups(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % GROUP:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {GROUP}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)


def group_codes(mask: torch.Tensor) -> torch.Tensor:
    """4-bit code (0..15) of every group of a boolean mask ``[..., in]`` -> ``[..., in/4]``."""
    g = _groups(mask.bool()).to(torch.int64)
    return (g * _BIT_WEIGHTS.to(g.device)).sum(-1)


def is_2to4(mask: torch.Tensor) -> bool:
    """True when every group of 4 along the last axis keeps exactly two entries."""
    if mask.shape[-1] % GROUP:
        return False
    return bool((_groups(mask.bool()).sum(-1) == 2).all())


def check_2to4(mask: torch.Tensor, what: str = "mask") -> None:
    """Raise :class:`NotTwoFourError` naming the first offending group unless ``mask`` is exactly 2:4."""
    if mask.shape[-1] % GROUP:
        raise NotTwoFourError(f"{what}: last dimension {mask.shape[-1]} is not a multiple of 4")
    kept = _groups(mask.bool()).sum(-1)
    bad = (kept != 2).nonzero()
    if bad.numel():
        first = tuple(bad[0].tolist())
        raise NotTwoFourError(
            f"{what}: {bad.shape[0]} group(s) are not 2:4; first at group index {first} "
            f"keeps {int(kept[first])} of 4"
        )


def ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pattern ids (uint8, 0..5) of an exactly-2:4 boolean mask ``[..., in]`` -> ``[..., in/4]``."""
    codes = group_codes(mask)
    ids = _CODE_TO_ID.to(codes.device)[codes]
    if (ids < 0).any():
        check_2to4(mask)  # raises with a precise message
    return ids.to(torch.uint8)


def mask_from_ids(ids: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask ``[..., groups*4]`` from pattern ids ``[..., groups]``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= N_PATTERNS):
        raise ValueError("pattern ids must lie in 0..5")
    m = PATTERNS.to(ids.device)[ids.long()]
    return m.reshape(*ids.shape[:-1], ids.shape[-1] * GROUP)


def topk_mask(scores: torch.Tensor) -> torch.Tensor:
    """2:4 mask keeping the two highest scores of every group (ties: lower position wins)."""
    g = _groups(scores)
    # a stable descending sort keeps the lower position first among equal scores
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(scores.shape)


def candidate_overlap(mask: torch.Tensor) -> torch.Tensor:
    """For every group, how many kept positions each of the six candidates shares with ``mask``.

    Returns ``[..., in/4, 6]`` integers in 0..2 (an exact 2:4 group overlaps itself by 2).
    """
    g = _groups(mask.bool()).to(torch.int64)
    return g @ PATTERNS.to(g.device).to(torch.int64).T


def pack_ids(ids: torch.Tensor) -> torch.Tensor:
    """Pack pattern ids into 3 bits each (little-endian bit stream) -> flat uint8 tensor.

    ``ceil(3 * n / 8)`` bytes for ``n`` ids; invert with :func:`unpack_ids` and the original shape.
    """
    flat = ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= N_PATTERNS):
        raise ValueError("pattern ids must lie in 0..5")
    shifts = torch.arange(ID_BITS, dtype=torch.int64, device=flat.device)
    bits = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64, device=flat.device))
    return (bits.reshape(-1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_ids(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_ids`: uint8 ids of the given shape."""
    n = 1
    for s in shape:
        n *= int(s)
    need = (n * ID_BITS + 7) // 8
    if packed.numel() != need:
        raise ValueError(f"packed ids hold {packed.numel()} bytes, expected {need} for shape {tuple(shape)}")
    b = packed.reshape(-1).to(torch.int64)
    bits = ((b[:, None] >> torch.arange(8, device=b.device)) & 1).reshape(-1)[: n * ID_BITS]
    ids = (bits.reshape(n, ID_BITS) << torch.arange(ID_BITS, device=b.device)).sum(-1)
    if n and int(ids.max()) >= N_PATTERNS:
        raise ValueError("packed ids are corrupt (value outside 0..5)")
    return ids.to(torch.uint8).reshape(tuple(shape))
