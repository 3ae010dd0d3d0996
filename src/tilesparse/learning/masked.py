"""Learnable masks on a model: module swap, per-layer mask construction inside the forward.

:class:`MaskedModel` replaces every prunable linear (``nn.Linear`` or GPT-2 ``Conv1D``) inside the
decoder blocks with a :class:`MaskedLinear` that holds the frozen original module plus fp32 logits:

- ``tile_logits [n_rows, n_cols]`` (PATCH-Joint, PATCH-Tile), or ``[1, n_cols]`` with ``tile_map='columns'``
  (one logit per tile-column, the same sampled value in all its tile-rows),
- ``pattern_logits [6, out, in/4]`` (candidate-major, PATCH-Joint and MaskLLM; given and reported to
  users as ``[out, in/4, 6]`` by :func:`~.priors.pattern_prior_logits` and the final mask) or compact fixed pattern ids
  ``ids [out, in/4]`` uint8 (PATCH-Tile).

On CUDA (when Triton is importable) the masked weight is built by the fused kernels of
:mod:`.fused_triton` (one forward and one backward kernel per layer, noise drawn in-kernel from a seed);
the torch compositions of :mod:`.relax` are the reference and the CPU path. The switch is
:attr:`MaskState.fused` (``MaskedModel(fused=...)``), else the environment variable
``TILESPARSE_FUSED_MASK`` (``0``/``off``, ``1``/``on``, ``auto``), else auto (CUDA weights only).

The mask of a layer is built inside that layer's forward (never all layers at once), so with gradient
checkpointing of the decoder blocks only one block's masks live at a time. The current schedule values
(scale, temperature), the stochastic switch and the per-step records (sampled tile values for the
density, masked-weight norms for the magnitude regulariser) live in a shared :class:`MaskState`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import TilesparseError
from ..options import LEARN_MODES, TILE_MAPS
from ..masks.nm import GROUP, N_PATTERNS, mask_from_ids
from ..masks.tiles import TileGrid
from ..models import find_decoder_blocks, find_prunable_linears
from ..settings import setting
from .final import LayerFinal, build_final_maskset, final_pattern_ids
from .relax import (binary_concrete, expected_tile_density, fused_soft_24, gumbel_noise, joint_masked_weight,
                    logistic_noise, tile_scaled_weight)


@dataclass
class MaskState:
    """Values shared by all masked layers during one step (set by the trainer)."""

    tile_k: float = 1.0
    tile_tau: float = 1.0
    pattern_k: float = 1.0
    pattern_tau: float = 1.0
    hard_tile: bool = False
    hard_24: bool = False
    stochastic: bool = True  # sample noise (training); False = noise-free relaxation
    record_norms: bool = False
    record_expected: bool = False  # record sigmoid(k * p) per layer in the forward (the expected density)
    tile_values: dict = field(default_factory=dict)  # layer index -> tile tensor (in graph)
    expected_values: dict = field(default_factory=dict)  # layer index -> sigmoid(k * p) (in graph)
    norms: dict = field(default_factory=dict)  # layer index -> ||M*W||_F (in graph)
    fused: bool | None = None  # fused Triton mask kernels: True/False force, None = env var, then auto
    bypass: bool = False  # True: every layer runs its unmasked weight (the dense teacher)

    def clear(self) -> None:
        self.tile_values.clear()
        self.expected_values.clear()
        self.norms.clear()


def tile_logit_shape(grid: TileGrid, tile_map: str = "free") -> tuple[int, int]:
    """Shape of a layer's tile logits: one per tile, or one per tile-column (``tile_map='columns'``)."""
    return (1, grid.n_cols) if tile_map == "columns" else grid.shape


class MaskedLinear(nn.Module):
    """A frozen linear layer whose weight is multiplied by a learnable relaxed mask in ``forward``."""

    def __init__(self, inner: nn.Module, *, index: int, name: str, mode: str, grid: TileGrid, state: MaskState,
                 transposed: bool, tile_logits: torch.Tensor | None, pattern_logits: torch.Tensor | None,
                 ids: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.index, self.layer_name, self.mode, self.grid, self.transposed = index, name, mode, grid, transposed
        self._state = [state]  # a list keeps it out of the module tree
        dev = inner.weight.device
        self.tile_logits = nn.Parameter(tile_logits.to(dev, torch.float32)) if tile_logits is not None else None
        # candidate-major storage [6, out, in/4]: the softmax over candidates is then contiguous passes
        self.pattern_logits = (nn.Parameter(pattern_logits.to(dev, torch.float32).permute(2, 0, 1).contiguous())
                               if pattern_logits is not None else None)
        if ids is not None:
            self.register_buffer("ids", ids.to(dev, torch.uint8))
        else:
            self.ids = None

    @property
    def state(self) -> MaskState:
        return self._state[0]

    def weight_oi(self) -> torch.Tensor:
        w = self.inner.weight
        return w.t() if self.transposed else w

    def tile_values(self) -> torch.Tensor | None:
        """Relaxed per-tile dense value ``T [n_rows, n_cols]`` for the current schedule (samples noise when
        stochastic); column-shared logits give one value per tile-column, repeated down the rows."""
        if self.tile_logits is None:
            return None
        st = self.state
        if st.record_expected:
            st.expected_values[self.index] = self._rows(torch.sigmoid(st.tile_k * self.tile_logits))
        noise = logistic_noise(self.tile_logits.shape, device=self.tile_logits.device) if st.stochastic else None
        return self._rows(binary_concrete(self.tile_logits, st.tile_k, st.tile_tau, noise=noise, hard=st.hard_tile))

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` over all tile-rows (a copy when the logits are shared by columns)."""
        return t if t.shape[0] == self.grid.n_rows else t.expand(self.grid.n_rows, -1).contiguous()

    def pattern_logits_natural(self) -> torch.Tensor | None:
        """Pattern logits as ``[out, in/4, 6]`` (a view)."""
        return None if self.pattern_logits is None else self.pattern_logits.permute(1, 2, 0)

    def mask24(self) -> torch.Tensor:
        """2:4 part: soft ``[out, in]`` fp32 mask (learned) or boolean mask from the fixed ids."""
        if self.pattern_logits is None:
            return mask_from_ids(self.ids)
        st = self.state
        noise = gumbel_noise(self.pattern_logits.shape, device=self.pattern_logits.device) if st.stochastic else None
        return fused_soft_24(self.pattern_logits, st.pattern_k, st.pattern_tau, noise=noise, hard=st.hard_24)

    def use_fused(self) -> bool:
        """Whether :meth:`masked_weight` takes the fused Triton path (see :func:`fused_choice`)."""
        w = self.weight_oi()
        choice = fused_choice(self.state.fused)
        if choice is False:
            return False
        if choice is None and w.device.type != "cuda":
            return False
        fused = _fused_module()
        if fused is None or not fused.available(w.device):
            if choice:
                raise TilesparseError("fused mask kernels forced on, but Triton cannot run on "
                                      f"{w.device} (not installed, or a CPU without TRITON_INTERPRET=1)")
            return False
        return fused.supports(w, self.grid)

    def _masked_weight_fused(self) -> torch.Tensor:
        from . import fused_triton

        w = self.weight_oi()
        st = self.state
        t = self.tile_values()
        if t is not None:
            st.tile_values[self.index] = t
        if self.pattern_logits is not None:
            wm, sq = fused_triton.fused_masked_weight(
                w, self.grid, logits=self.pattern_logits, tiles=t, scale=st.pattern_k, tau=st.pattern_tau,
                hard=st.hard_24, noise=st.stochastic, record_sq=st.record_norms)
        else:
            wm, sq = fused_triton.fused_masked_weight(w, self.grid, ids=self.ids, tiles=t,
                                                      record_sq=st.record_norms)
        if st.record_norms:
            st.norms[self.index] = sq.sqrt()
        return wm

    def masked_weight(self) -> torch.Tensor:
        """``W * M`` as ``[out, in]`` in the weight's dtype; records tile values and the norm in the state."""
        if self.use_fused():
            return self._masked_weight_fused()
        w = self.weight_oi()
        m24 = self.mask24()
        t = self.tile_values()
        st = self.state
        if t is None:
            wm = w * m24.to(w.dtype)
        else:
            st.tile_values[self.index] = t
            if m24.dtype == torch.bool:  # fixed 2:4: kept weights stay, the others scale with T
                wm = tile_scaled_weight(w, m24, t, self.grid)
            else:
                wm = joint_masked_weight(w, m24, t, self.grid)
        if st.record_norms:
            st.norms[self.index] = torch.linalg.vector_norm(wm.float())
        return wm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.bypass:
            return self.inner(x)
        wm = self.masked_weight()
        bias = self.inner.bias
        if not self.transposed:
            return F.linear(x, wm, bias)
        shape = x.shape[:-1] + (wm.shape[0],)  # GPT-2 Conv1D semantics
        y = x.reshape(-1, x.shape[-1]) @ wm.t()
        if bias is not None:
            y = y + bias
        return y.reshape(shape)


_FUSED_MODULE: list = []


def _fused_module():
    """:mod:`.fused_triton`, or ``None`` when Triton is not importable (cached)."""
    if not _FUSED_MODULE:
        try:
            from . import fused_triton
        except Exception:  # no triton, or a triton that cannot initialise here
            fused_triton = None
        _FUSED_MODULE.append(fused_triton)
    return _FUSED_MODULE[0]


def fused_choice(explicit: bool | None = None) -> bool | None:
    """``True``/``False`` when the fused mask kernels are forced on/off (``explicit``, else the environment
    variable ``TILESPARSE_FUSED_MASK``), ``None`` for auto (used for CUDA weights when Triton imports)."""
    if explicit is not None:
        return bool(explicit)
    return setting("fused_mask")


class MaskedModel:
    """Wrap a model's prunable linears with learnable masks; restore them with :meth:`remove`.

    ``tile_init`` / ``pattern_init`` / ``ids`` map layer names to initial tile logits, initial pattern
    logits and fixed 2:4 ids (whichever the mode uses); ``initial``, when given, replaces them: it is called
    once per wrapped layer, in order, with the layer's name and returns ``(tile logits, pattern logits
    [out, in/4, 6], ids)`` (``None`` for what the mode does not use), so that the initial values of all layers
    never exist at once. ``on_block(block, layers)`` runs after the linears of each decoder block are
    wrapped (``layers``: its :class:`MaskedLinear` modules); sharded learning shards the block there.
    ``fused`` forces the fused Triton mask kernels on or off (``None``: the ``TILESPARSE_FUSED_MASK``
    variable, else on for CUDA weights); a layer the kernels do not support (see
    :func:`.fused_triton.supports`) takes the torch path. Layers whose ``in`` is not a multiple of 4 are
    left dense and unwrapped. ``tile_map='columns'``: one tile logit per tile-column (``[1, n_cols]``), and
    the final mask keeps whole tile-columns dense or 2:4 (:data:`~tilesparse.options.TileMap`).

    Once sharded (FSDP2), the logits are DTensors: :meth:`logits_state`, :meth:`load_logits_state` and
    :meth:`final_maskset` are then collectives that every process must call.
    """

    def __init__(self, model: nn.Module, mode: str, *, tile: tuple[int, int] = (128, 128),
                 tile_init: dict[str, torch.Tensor] | None = None,
                 pattern_init: dict[str, torch.Tensor] | None = None,
                 ids: dict[str, torch.Tensor] | None = None, fused: bool | None = None,
                 initial: Callable[[str], tuple] | None = None,
                 on_block: Callable[[nn.Module, list], None] | None = None, tile_map: str = "free"):
        if mode not in LEARN_MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if tile_map not in TILE_MAPS:
            raise ValueError(f"unknown tile map {tile_map!r} ({', '.join(TILE_MAPS)})")
        self.model, self.mode, self.tile, self.tile_map = model, mode, tuple(tile), tile_map
        self.state = MaskState(fused=fused)
        self.linears = find_prunable_linears(model)
        self.block_of = {lin.name: lin.block_index for lin in self.linears}
        self.layers: list[MaskedLinear] = []
        self.fixed: list = []  # layers left dense (in % 4 != 0)
        self._checkpointed: list = []
        for p in model.parameters():
            p.requires_grad_(False)
        weight_norms, self._tile_numel = [], []
        _, blocks = find_decoder_blocks(model)
        by_block: dict[int, list] = {}
        for lin in self.linears:
            by_block.setdefault(lin.block_index, []).append(lin)
        for b, block in enumerate(blocks):
            wrapped_here = []
            for lin in by_block.get(b, []):
                grid = TileGrid(lin.out_features, lin.in_features, *self.tile)
                if lin.in_features % GROUP:
                    self.fixed.append(lin)
                    continue
                if initial is not None:
                    t_init, p_init, l_ids = initial(lin.name)
                else:
                    t_init = (tile_init or {}).get(lin.name)
                    p_init = (pattern_init or {}).get(lin.name)
                    l_ids = (ids or {}).get(lin.name)
                t_init, p_init, l_ids = self._check_init(lin, grid, t_init, p_init, l_ids)
                wrapped = MaskedLinear(lin.module, index=len(self.layers), name=lin.name, mode=mode, grid=grid,
                                       state=self.state, transposed=lin.transposed, tile_logits=t_init,
                                       pattern_logits=p_init, ids=l_ids)
                del t_init, p_init
                self._swap(lin.name, wrapped)
                self.layers.append(wrapped)
                wrapped_here.append(wrapped)
                w = wrapped.weight_oi()
                with torch.no_grad():
                    weight_norms.append(torch.linalg.vector_norm(w.float()))
                self._tile_numel.append(grid.tile_numel().to(torch.float32).to(w.device))
            if on_block is not None:
                on_block(block, wrapped_here)
        self.total_numel = sum(lin.numel for lin in self.linears)
        self.fixed_numel = sum(lin.numel for lin in self.fixed)
        self.weight_norm_sum = float(sum(weight_norms))

    def _check_init(self, lin, grid: TileGrid, t_init, p_init, l_ids):
        shape24 = (lin.out_features, lin.in_features // GROUP, N_PATTERNS)
        if self.mode in ("joint", "tile"):
            shape = tile_logit_shape(grid, self.tile_map)
            t_init = torch.zeros(shape) if t_init is None else t_init
            if tuple(t_init.shape) != shape:
                raise ValueError(f"{lin.name}: tile logits {tuple(t_init.shape)} do not match {shape} (grid "
                                 f"{grid.shape}, tile map {self.tile_map})")
        else:
            t_init = None
        if self.mode in ("joint", "maskllm"):
            p_init = torch.zeros(shape24) if p_init is None else p_init
            if tuple(p_init.shape) != shape24:
                raise ValueError(f"{lin.name}: pattern logits {tuple(p_init.shape)} do not match {shape24}")
            l_ids = None
        else:
            p_init = None
            if l_ids is None or tuple(l_ids.shape) != shape24[:2]:
                raise ValueError(f"{lin.name}: PATCH-Tile needs fixed 2:4 ids of shape {shape24[:2]}")
        return t_init, p_init, l_ids

    # -- module surgery -------------------------------------------------------------------------
    def _swap(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def remove(self) -> None:
        """Put the original linear modules back (logits are dropped from the model)."""
        for layer in self.layers:
            self._swap(layer.layer_name, layer.inner)
        self.disable_checkpointing()
        self.layers = []

    @contextlib.contextmanager
    def unmasked(self):
        """Inside this block the model runs with its original dense weights (the teacher of distillation)."""
        previous, self.state.bypass = self.state.bypass, True
        try:
            yield self.model
        finally:
            self.state.bypass = previous

    def enable_checkpointing(self) -> None:
        """Recompute every decoder block in backward (non-reentrant; RNG state preserved, so the
        recomputed masks equal the sampled ones)."""
        from torch.utils.checkpoint import checkpoint

        if self._checkpointed:
            return
        _, blocks = find_decoder_blocks(self.model)
        for block in blocks:
            orig = block.forward

            @functools.wraps(orig)
            def fwd(*args, __orig=orig, **kwargs):
                if not torch.is_grad_enabled():
                    return __orig(*args, **kwargs)
                return checkpoint(__orig, *args, use_reentrant=False, **kwargs)

            block.forward = fwd
            self._checkpointed.append((block, orig))

    def disable_checkpointing(self) -> None:
        for block, _ in self._checkpointed:
            if "forward" in block.__dict__:
                del block.forward
        self._checkpointed = []

    # -- parameters -----------------------------------------------------------------------------
    def tile_parameters(self) -> list[nn.Parameter]:
        return [l.tile_logits for l in self.layers if l.tile_logits is not None]

    def pattern_parameters(self) -> list[nn.Parameter]:
        return [l.pattern_logits for l in self.layers if l.pattern_logits is not None]

    def parameters(self) -> list[nn.Parameter]:
        return self.tile_parameters() + self.pattern_parameters()

    def logit_tensors(self) -> dict[str, torch.Tensor]:
        """The learnable logits and fixed ids themselves (no copies; DTensors once sharded), by
        ``<layer name>:<kind>``, pattern logits in the storage layout ``[6, out, in/4]``."""
        out = {}
        for l in self.layers:
            if l.tile_logits is not None:
                out[f"{l.layer_name}:tile"] = l.tile_logits
            if l.pattern_logits is not None:
                out[f"{l.layer_name}:pattern"] = l.pattern_logits
            if l.ids is not None:
                out[f"{l.layer_name}:ids"] = l.ids
        return out

    def logits_state(self, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """All learnable logits and fixed ids, by ``<layer name>:<kind>`` (CPU copies; pattern logits in the
        candidate-major storage layout ``[6, out, in/4]``). Sharded logits are gathered one at a time; with
        ``rank0_only`` only rank 0 keeps them (the others return an empty dict)."""
        from .sharded import full_tensor, is_dtensor

        keep = not rank0_only or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        out = {}
        for key, t in self.logit_tensors().items():
            full = full_tensor(t.detach()) if is_dtensor(t) else t.detach()
            if keep:
                out[key] = full.cpu().clone()
        return out

    @torch.no_grad()
    def load_logits_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`logits_state` (shapes must match; sharded logits keep their own shard)."""
        from .sharded import copy_full_into

        current = self.logit_tensors()
        if set(state) != set(current):
            missing = sorted(set(current) - set(state))[:3]
            extra = sorted(set(state) - set(current))[:3]
            raise ValueError(f"logit state does not match the model (missing {missing}, unexpected {extra})")
        for key, t in current.items():
            src = state[key]
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{key}: shape {tuple(src.shape)} != {tuple(t.shape)}")
            copy_full_into(t, src)

    def logit_bytes(self) -> dict[str, int]:
        """Bytes of tile logits, pattern logits, fixed ids, and of the masked weights."""
        tile = sum(p.numel() * p.element_size() for p in self.tile_parameters())
        pat = sum(p.numel() * p.element_size() for p in self.pattern_parameters())
        ids = sum(l.ids.numel() * l.ids.element_size() for l in self.layers if l.ids is not None)
        weights = sum(l.inner.weight.numel() * l.inner.weight.element_size() for l in self.layers)
        return {"tile_logits": tile, "pattern_logits": pat, "ids": ids, "weights": weights}

    # -- schedules and regulariser inputs ----------------------------------------------------------
    def set_values(self, *, tile_k: float, tile_tau: float, pattern_k: float, pattern_tau: float,
                   hard_tile: bool = False, hard_24: bool = False, stochastic: bool = True,
                   record_norms: bool = False, record_expected: bool = False) -> None:
        """Schedule values and switches for the next forward (``record_expected``: record the expected tile
        values inside each layer's forward, as :meth:`densities` with ``'expected'`` needs on sharded logits)."""
        s = self.state
        s.tile_k, s.tile_tau, s.pattern_k, s.pattern_tau = tile_k, tile_tau, pattern_k, pattern_tau
        s.hard_tile, s.hard_24, s.stochastic, s.record_norms = hard_tile, hard_24, stochastic, record_norms
        s.record_expected = record_expected

    def layer_kept(self, estimate: str) -> list[torch.Tensor]:
        """Kept-weight count of every wrapped layer from the sampled (last forward) or expected tile values."""
        out = []
        for l, tn in zip(self.layers, self._tile_numel):
            if l.tile_logits is None:
                out.append(torch.tensor(l.grid.numel * 0.5, device=tn.device))
                continue
            if estimate == "sampled":
                t = self.state.tile_values.get(l.index)
                if t is None:
                    raise RuntimeError(f"{l.layer_name}: no sampled tile values (was the forward run?)")
            else:
                t = self.state.expected_values.get(l.index)
                if t is None:  # not recorded in the forward: from the (unsharded) logits
                    t = torch.sigmoid(self.state.tile_k * l.tile_logits)
            out.append(expected_tile_density(t, tn))
        return out

    def densities(self, estimate: str = "sampled", scope: str = "global") -> torch.Tensor:
        """Relaxed density: one global value (numel-weighted) or one per decoder block."""
        kept = self.layer_kept(estimate)
        if scope == "global":
            return (torch.stack(kept).sum() + self.fixed_numel) / self.total_numel
        per_block: dict[int, list] = {}
        sizes: dict[int, int] = {}
        for l, k in zip(self.layers, kept):
            b = self.block_of[l.layer_name]
            per_block.setdefault(b, []).append(k)
            sizes[b] = sizes.get(b, 0) + l.grid.numel
        for f in self.fixed:
            per_block.setdefault(f.block_index, []).append(torch.tensor(float(f.numel), device=kept[0].device))
            sizes[f.block_index] = sizes.get(f.block_index, 0) + f.numel
        return torch.stack([torch.stack(per_block[b]).sum() / sizes[b] for b in sorted(per_block)])

    def masked_norm_sum(self) -> torch.Tensor:
        """Sum of ``||M*W||_F`` recorded in the last forward (needs ``record_norms``)."""
        return torch.stack([self.state.norms[l.index] for l in self.layers]).sum()

    # -- final mask -----------------------------------------------------------------------------
    def final_maskset(self, sparsity: float, meta: dict | None = None):
        """Binary mask set: argmax 2:4 (or fixed ids), tiles at the exact global budget (MaskLLM: all 2:4).

        Sharded logits: each process takes the argmax of its own shard of the pattern logits and the ids are
        gathered; the tile logits (one per tile) are gathered whole, so that every process ranks all tiles
        of all layers and returns the same mask set as one process would from the same logits."""
        from .sharded import full_tensor, is_dtensor

        finals = []
        for l in self.layers:
            if l.pattern_logits is None:
                ids = l.ids.cpu()
            elif is_dtensor(l.pattern_logits):
                ids = full_tensor(l.pattern_logits.detach().argmax(dim=0).to(torch.uint8)).cpu()
            else:
                ids = final_pattern_ids(l.pattern_logits_natural().detach().cpu())
            scores = full_tensor(l.tile_logits.detach()).cpu() if l.tile_logits is not None else None
            finals.append(LayerFinal(l.layer_name, l.grid, ids, scores))
        for f in self.fixed:
            finals.append(LayerFinal(f.name, TileGrid(f.out_features, f.in_features, *self.tile), None, None))
        order = {lin.name: i for i, lin in enumerate(self.linears)}
        finals.sort(key=lambda x: order[x.name])
        return build_final_maskset(finals, sparsity, all_sparse=self.mode == "maskllm", meta=meta,
                                   tile_map=self.tile_map)


__all__ = ["MaskState", "MaskedLinear", "MaskedModel", "fused_choice", "tile_logit_shape"]
