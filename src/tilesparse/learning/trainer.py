"""Mask-learning loop: AdamW on the logits only, gradient accumulation, cosine LR with warm-up,
atomic checkpoints with bit-exact resume, NaN guard, and learning on several processes through
``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPUs): data-parallel with replicated logits,
or sharded with FSDP2 (:mod:`.sharded`: weights, logits and optimiser state split over the processes,
checkpoints in :mod:`.sharded_checkpoint` that resume on another number of processes).

Orchestration only; the math lives in :mod:`.relax`, :mod:`.regularizers`, :mod:`.priors`, :mod:`.final`.

Determinism: the data order is a pure function of (seed, step); the noise comes from the global torch
RNG seeded with ``seed + rank`` and saved in every checkpoint together with the optimiser state and
the logits, so an interrupted run resumed from its last checkpoint ends with the same logits as an
uninterrupted one. A sharded checkpoint resumed on another number of processes keeps the data order (the
global batch must stay the same) but not the noise, which is drawn per process: each process then starts
from a seed derived from (seed, step, rank).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import TilesparseError
from ..masks.tiles import TileGrid
from ..models import find_prunable_linears, weights_fingerprint
from .config import MODE_NAMES, LearnConfig, check_resumable, finalize
from .final import density_report
from .masked import MaskedModel, tile_logit_shape
from .priors import (OneShotMasks, init_logits, one_shot_masks, one_shot_prior, pattern_prior_logits,
                     prior_maskset, tile_prior_logits)
from . import sharded_checkpoint as dcp_ckpt
from .sharded import Sharder, fork_model, local, offload_parameters, resolve_shard
from ..atomic import atomic_torch_save, atomic_write_text
from .regularizers import density_penalty, distillation_loss, magnitude_bonus, magnitude_decay
from .relax import LinearSchedule

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "tilesparse-learn-checkpoint"
CHECKPOINT_VERSION = 1
SINGLE, SHARDED = "single", "sharded"  # checkpoint layouts: one torch file, or a DCP folder
PRIOR_DIR = "prior"  # beside the checkpoint: the prior's binary mask, kept for resumed runs


# -- distributed helpers -------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group (``(0, 1)`` without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (no-op for a single process).

    Uses NCCL for CUDA devices and gloo otherwise; on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist_info()


def _allreduce_mean(tensors: list[torch.Tensor], world: int, bucket_numel: int = 1 << 24) -> None:
    """Average tensors across ranks in place, in flat buckets."""
    bucket: list[torch.Tensor] = []

    def flush():
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        flat /= world
        off = 0
        for t in bucket:
            t.copy_(flat[off: off + t.numel()].view_as(t))
            off += t.numel()
        bucket.clear()

    size = 0
    for t in tensors:
        bucket.append(t)
        size += t.numel()
        if size >= bucket_numel:
            flush()
            size = 0
    flush()


# -- pure schedule / data helpers ---------------------------------------------------------------
def warmup_steps(cfg: LearnConfig) -> int:
    """Warm-up length in optimiser steps (``warmup < 1`` is a fraction of the run)."""
    w = cfg.warmup if cfg.warmup >= 1 else math.ceil(cfg.warmup * cfg.steps)
    return int(min(max(w, 0), cfg.steps))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay towards ``min_ratio`` (reached after the last step)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    rest = total - warmup
    if rest <= 0:
        return 1.0
    progress = (step - warmup) / rest  # the last step still learns (factor > min_ratio)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WindowSampler:
    """Deterministic training batches: non-overlapping windows of the token stream, reshuffled per epoch.

    With ``bos_id`` every window is that token followed by ``seqlen - 1`` tokens of the stream (models that
    need BOS, like Gemma, are trained as they are evaluated). The ``p``-th sample overall (counted across
    ranks and micro-batches) is window ``perm(seed, p // n)[p % n]``, so any step's batch can be recomputed
    without replaying the run.
    """

    def __init__(self, ids: torch.Tensor, seqlen: int, seed: int, bos_id: int | None = None):
        from ..data.text import eval_windows

        body = seqlen - 1 if bos_id is not None else seqlen
        if body < 1 or ids.numel() < body:
            raise TilesparseError(f"training text has {ids.numel()} tokens, fewer than one window of {seqlen}")
        self.windows = eval_windows(ids, seqlen, bos_id=bos_id)  # the evaluation's windows, BOS included
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.windows.shape[0]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self), generator=g))
        return self._perm[1]

    def batch(self, first_sample: int, size: int) -> torch.Tensor:
        rows = []
        for p in range(first_sample, first_sample + size):
            rows.append(self._permutation(p // len(self))[p % len(self)])
        return self.windows[torch.stack(rows)]


# -- I/O -------------------------------------------------------------------------------------
def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a learning checkpoint (``checkpoint.pt`` or a sharded ``checkpoint.dcp``)."""
    return (Path(directory) / CHECKPOINT).is_file() or dcp_ckpt.checkpoint_dir(directory) is not None


def load_checkpoint(directory: str | os.PathLike) -> dict:
    """Read a learning checkpoint (raising :class:`TilesparseError` for anything that is not one).

    ``checkpoint.pt`` gives everything, tensors included; a sharded checkpoint (``checkpoint.dcp``) gives
    the same keys without ``logits`` and ``optimizer`` (they are read into the sharded model on resume),
    with ``layout`` ``'sharded'``."""
    path = Path(directory) / CHECKPOINT
    sharded = None if path.is_file() else dcp_ckpt.checkpoint_dir(directory)
    if not path.is_file() and sharded is None:
        raise TilesparseError(f"no learning checkpoint in {directory} (expected {CHECKPOINT} or {dcp_ckpt.DIRNAME})")
    if sharded is not None:
        path = sharded / dcp_ckpt.META
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TilesparseError(f"{path} is not a readable checkpoint: {str(exc).splitlines()[0]}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise TilesparseError(f"{path} is not a tilesparse learning checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise TilesparseError(f"{path}: checkpoint version {ck.get('version')} is not supported")
    ck.setdefault("layout", SINGLE)
    return ck


def discard_checkpoint(out_dir: str | os.PathLike) -> int:
    """Delete the resumable state of a finished run in ``out_dir`` (checkpoint, sharded or not, and its JSON
    note); returns the bytes freed. The masks, the prior and the report stay."""
    freed = 0
    for name in (CHECKPOINT, "checkpoint.json"):
        path = Path(out_dir) / name
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
    return freed + dcp_ckpt.discard_sharded_checkpoint(out_dir)


# -- priors ----------------------------------------------------------------------------------
def iter_initial_logits(model: nn.Module, cfg: LearnConfig, calib_ids: torch.Tensor | None,
                        progress: bool = False, prior_masks: OneShotMasks | None = None):
    """Initial ``(layer name, tile logits, pattern logits [out, in/4, 6], fixed ids)`` of every 2:4-capable
    layer, one layer at a time in model order: ``N(0, std^2)`` + the one-shot prior (``None`` for what the
    mode does not use).

    ``prior_masks`` supplies precomputed one-shot masks (e.g. shared by several runs of a benchmark);
    otherwise the ``cfg.prior`` pruner runs here.
    """
    linears = [l for l in find_prunable_linears(model) if l.in_features % 4 == 0]
    need_tiles = cfg.mode in ("joint", "tile")
    shots = prior_masks
    if shots is None:
        shots = one_shot_masks(model, linears, calib_ids, method=cfg.prior, sparsity=cfg.sparsity,
                               need_unstructured=need_tiles, need_24=True, progress=progress)
    gen = torch.Generator().manual_seed(cfg.seed)
    from ..masks.nm import ids_from_mask

    for lin in linears:
        grid = TileGrid(lin.out_features, lin.in_features, *cfg.tile)
        tile = pattern = ids = None
        if need_tiles:
            shape = tile_logit_shape(grid, cfg.tile_map)
            tile = init_logits(shape, cfg.init_std, gen)
            if lin.name in shots.unstructured and cfg.prior_strength > 0:
                tile = tile + tile_prior_logits(shots.unstructured[lin.name].cpu(), grid, cfg.sparsity,
                                                std=cfg.init_std, strength=cfg.prior_strength,
                                                tile_map=cfg.tile_map)[: shape[0]]
        if cfg.mode in ("joint", "maskllm"):
            pattern = init_logits((lin.out_features, lin.in_features // 4, 6), cfg.init_std, gen)
            if lin.name in shots.two_four and cfg.prior_strength > 0:
                pattern = pattern + pattern_prior_logits(shots.two_four[lin.name].cpu(), std=cfg.init_std,
                                                         strength=cfg.prior_strength)
        else:
            if lin.name not in shots.two_four:
                raise TilesparseError(f"{lin.name}: the {cfg.prior} prior gave no 2:4 mask for PATCH-Tile")
            ids = ids_from_mask(shots.two_four[lin.name].cpu())
        yield lin.name, tile, pattern, ids


def build_initial_logits(model: nn.Module, cfg: LearnConfig, calib_ids: torch.Tensor | None,
                         progress: bool = False, prior_masks: OneShotMasks | None = None
                         ) -> tuple[dict, dict, dict]:
    """Initial tile logits, pattern logits and fixed ids per layer (:func:`iter_initial_logits` collected
    into three dicts by layer name)."""
    tiles, patterns, ids = {}, {}, {}
    for name, t, p, i in iter_initial_logits(model, cfg, calib_ids, progress, prior_masks):
        for dest, v in ((tiles, t), (patterns, p), (ids, i)):
            if v is not None:
                dest[name] = v
    return tiles, patterns, ids


def _in_order(items):
    """``initial(name)`` for :class:`MaskedModel` from an iterator of ``(name, tile, pattern, ids)`` in layer order."""
    it = iter(items)

    def initial(name: str):
        got, tile, pattern, ids = next(it)
        if got != name:  # pragma: no cover - both walk find_prunable_linears
            raise RuntimeError(f"initial logits for {got} offered to {name}")
        return tile, pattern, ids

    return initial


# -- results ---------------------------------------------------------------------------------
@dataclass
class LearnResult:
    """Outcome of :func:`learn_masks`."""

    maskset: object  # tilesparse.masks.MaskSet
    config: LearnConfig
    history: list[dict]
    report: dict
    seconds: float
    tokens: int
    out_dir: Path | None = None
    files: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)  # final logits (and fixed ids) by "<layer>:<kind>", CPU
    # (sharded runs: on rank 0 only)
    prior: object = None  # the one-shot prior as a binary MaskSet (what learning started from), if any
    sharded: bool = False  # whether the run sharded the model, the logits and the optimiser state (FSDP2)


class StopRequested(Exception):
    """Raised by a step callback to stop training early (tests use it to simulate a crash)."""


def _save_maskset(maskset, path: Path) -> str:
    """Save through the project's mask artifact format (``path/masks.safetensors``; a torch file
    ``path/masks.pt`` only when :mod:`tilesparse.io` is missing)."""
    try:
        from ..io import save_mask_artifact  # type: ignore[attr-defined]
    except ImportError:
        save_mask_artifact = None
    if save_mask_artifact is not None:
        return str(save_mask_artifact(maskset, path))
    fallback = Path(path) / "masks.pt"
    payload = {"meta": maskset.meta, "layers": {m.name: {
        "out_features": m.out_features, "in_features": m.in_features, "pattern": m.pattern, "tile": list(m.tile),
        "kinds": m.kinds, "ids": m.ids, "keep": m.keep} for m in maskset}}
    atomic_torch_save(payload, fallback)
    return str(fallback)


# -- the loop --------------------------------------------------------------------------------
def learn_masks(model: nn.Module, cfg: LearnConfig, train_ids: torch.Tensor, *,
                out_dir: str | os.PathLike | None = None, resume: bool = False, model_name: str = "model",
                calib_ids: torch.Tensor | None = None, prior_masks: OneShotMasks | None = None,
                progress: bool = True, callback: Callable[[int, dict], None] | None = None,
                bos_id: int | None = None) -> LearnResult:
    """Learn masks for ``model`` (weights frozen, left untouched) and return the final binary masks.

    ``train_ids`` is the 1-D token stream of the training text (``bos_id``: start every training window with
    that token, for models that need BOS; :attr:`LoadedModel.bos_id`); ``calib_ids [n, len]`` feeds the one-shot
    prior (ignored for ``prior='magnitude'``/``'none'``); ``prior_masks`` (:class:`~.priors.OneShotMasks`)
    replaces the pruner run with precomputed masks. With ``out_dir`` a checkpoint is written
    atomically every ``cfg.checkpoint_every`` steps and at the end, plus the mask artifact and a JSON
    report; ``resume=True`` continues from ``out_dir``'s checkpoint (which must come from the same model
    and config). ``callback(step, metrics)`` runs after every optimiser step (rank 0 and others).
    """
    from ..quant.state import check_not_quantized

    check_not_quantized(model, "learn")
    rank, world = dist_info()
    cfg = finalize(cfg.model_copy(update={"world_size": world}))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    fingerprint = weights_fingerprint(model)
    ck = None
    layout_ck = None
    if resume:
        if out is None:
            raise TilesparseError("resuming needs the run's output directory")
        ck = load_checkpoint(out)
        layout_ck = ck["layout"]
        check_resumable(ck["config"], cfg, elastic=layout_ck == SHARDED)
        if ck.get("fingerprint") != fingerprint:
            raise TilesparseError(f"cannot resume: the checkpoint in {out} was made for another model "
                                  f"({ck.get('model')}, weights {ck.get('fingerprint')} vs {fingerprint})")
        if layout_ck == SINGLE and cfg.shard:
            raise TilesparseError(f"cannot resume with sharding: the checkpoint in {out} comes from an unsharded "
                                  "run (resume it without --shard)")
    sharded = resolve_shard(False if layout_ck == SINGLE else cfg.shard, world, model, cfg.mode, cfg.tile,
                            device)
    if sharded and cfg.tile_map != "free":
        raise TilesparseError(f"tile_map {cfg.tile_map!r} is not supported by sharded learning yet, and this run "
                              "shards (the model does not fit replicated, or the checkpoint is sharded)")
    layout = SHARDED if (sharded or cfg.shard or layout_ck == SHARDED) else SINGLE
    t_start = time.perf_counter()

    prior = None
    tiles = patterns = ids = initial = None
    if ck is None:
        if prior_masks is None:
            prior_masks = one_shot_prior(model, calib_ids, method=cfg.prior, mode=cfg.mode, sparsity=cfg.sparsity,
                                         progress=progress and rank == 0)
        initial = _in_order(iter_initial_logits(model, cfg, calib_ids, prior_masks=prior_masks))
        if prior_masks.two_four:
            prior = prior_maskset(prior_masks, find_prunable_linears(model), cfg.mode, cfg.sparsity, cfg.tile,
                                  meta={"model": model_name, "fingerprint": fingerprint}, tile_map=cfg.tile_map)
            if out is not None and rank == 0:
                _save_maskset(prior, out / PRIOR_DIR)
    else:
        if out is not None and (out / PRIOR_DIR).is_dir():
            from ..io import load_mask_artifact

            prior = load_mask_artifact(out / PRIOR_DIR)
        if layout_ck == SINGLE:
            split = {"tile": {}, "pattern": {}, "ids": {}}
            for key, t in ck["logits"].items():
                name, _, kind = key.rpartition(":")
                split.setdefault(kind, {})[name] = t
            tiles, ids = split["tile"], split["ids"]
            patterns = {k: v.permute(1, 2, 0) for k, v in split["pattern"].items()}  # stored candidate-major
        else:  # placeholders of the right shapes; the sharded checkpoint fills them
            groups = {l.name: (l.out_features, l.in_features // 4) for l in find_prunable_linears(model)}

            def initial(name):
                return None, None, (torch.zeros(groups[name], dtype=torch.uint8) if cfg.mode == "tile" else None)

    work, sharder, restore = model, None, None
    if sharded:
        work = fork_model(model)  # FSDP changes the copy's modules, never the caller's
        sharder = Sharder(device)
    masked = MaskedModel(work, cfg.mode, tile=cfg.tile, tile_init=tiles, pattern_init=patterns, ids=ids,
                         initial=initial, tile_map=cfg.tile_map,
                         on_block=sharder.shard_block if sharder is not None else None)
    del tiles, patterns, ids, initial  # the one-shot masks and initial values are not needed any more
    prior_masks = None
    try:
        if sharder is not None:
            sharder.shard_root(work)
            restore = offload_parameters(model)
        res = _train(work, masked, cfg, train_ids, ck, out, rank, world, device, fingerprint, model_name,
                     progress, callback, t_start, bos_id, sharded, layout)
        res.prior = prior
        return res
    finally:
        masked.remove()
        if restore is not None:
            restore()


def _resume_seed(seed: int, step: int, rank: int) -> int:
    """The noise seed of process ``rank`` when a sharded run resumes at ``step`` on another number of processes."""
    return (seed * 1_000_003 + step) * 65_537 + rank


def _train(model, masked: MaskedModel, cfg: LearnConfig, train_ids, ck, out, rank, world, device, fingerprint,
           model_name, progress, callback, t_start, bos_id, sharded, layout) -> LearnResult:
    if ck is not None and ck["layout"] == SINGLE:
        masked.load_logits_state(ck["logits"])
    elif ck is None and world > 1 and not sharded:  # every rank starts from rank 0's logits (sharded: per block)
        with torch.no_grad():
            for t in masked.parameters() + [l.ids for l in masked.layers if l.ids is not None]:
                dist.broadcast(t, src=0)
    if cfg.grad_checkpointing:
        masked.enable_checkpointing()
    base_tile_lr = cfg.tile_lr if cfg.tile_lr is not None else cfg.lr
    groups = []
    if masked.pattern_parameters():
        groups.append({"params": masked.pattern_parameters(), "lr": cfg.lr, "base_lr": cfg.lr, "name": "pattern"})
    if masked.tile_parameters():
        groups.append({"params": masked.tile_parameters(), "lr": base_tile_lr, "base_lr": base_tile_lr,
                       "name": "tile"})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = WindowSampler(train_ids, cfg.seqlen, cfg.seed, bos_id)
    history: list[dict] = []
    start = 0
    if ck is not None:
        if ck["layout"] == SINGLE:
            opt.load_state_dict(ck["optimizer"])
        else:
            dcp_ckpt.load_sharded_checkpoint(out, {k: t.detach() for k, t in masked.logit_tensors().items()},
                                             opt, model)
        start = int(ck["step"])
        history = list(ck.get("history", []))
        rngs = ck["rng"]
        if ck["layout"] == SHARDED and len(rngs) != world:  # the noise streams are per process
            torch.manual_seed(_resume_seed(cfg.seed, start, rank))
        else:
            _set_rng_state(rngs[rank] if len(rngs) > rank else rngs[0])
    else:
        torch.manual_seed(cfg.seed + rank)
    sched = {"tile_k": LinearSchedule(*cfg.tile_k), "tile_tau": LinearSchedule(*cfg.tile_tau),
             "pattern_k": LinearSchedule(*cfg.pattern_k), "pattern_tau": LinearSchedule(*cfg.pattern_tau)}
    wu = warmup_steps(cfg)
    per_step = cfg.batch * cfg.grad_accum * world
    last_ckpt = start if ck is not None else None
    ckpt_path = out / CHECKPOINT if out is not None else None

    def save_checkpoint(next_step: int) -> None:
        rngs = [_rng_state()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg.to_dict(),
                "model": model_name, "fingerprint": fingerprint, "step": next_step,
                "samples_seen": next_step * per_step, "rng": rngs, "history": history, "layout": layout}
        if layout == SHARDED:
            dcp_ckpt.save_sharded_checkpoint(out, masked.logit_tensors(), opt, model, meta)
        elif rank == 0 and ckpt_path is not None:
            atomic_torch_save({**meta, "logits": masked.logits_state(), "optimizer": opt.state_dict()}, ckpt_path)
        if rank == 0 and out is not None:
            atomic_write_text(json.dumps({"step": next_step, "steps": cfg.steps, "mode": cfg.mode,
                                          "model": model_name, "layout": layout}, indent=1), out / "checkpoint.json")

    bar = tqdm(total=cfg.steps, initial=start, desc=f"learn {cfg.mode}", unit="step",
               disable=not progress or rank != 0, dynamic_ncols=True)
    model.eval()
    target = cfg.target_density
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            vals = {k: s.at(step, cfg.steps) for k, s in sched.items()}
            decay = magnitude_decay(step, cfg.steps)
            record = cfg.l2 > 0 and decay > 0
            masked.set_values(**vals, hard_tile=cfg.hard_tile, hard_24=cfg.hard_24, stochastic=True,
                              record_norms=record, record_expected=cfg.density_estimate == "expected")
            factor = lr_factor(step, cfg.steps, wu, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            opt.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "density": 0.0, "mag": 0.0}
            for micro in range(cfg.grad_accum):
                first = step * per_step + micro * cfg.batch * world + rank * cfg.batch
                batch = sampler.batch(first, cfg.batch).to(device)
                masked.state.clear()
                teacher = None
                if cfg.loss != "ce":
                    with torch.no_grad(), masked.unmasked():
                        teacher = model(input_ids=batch, use_cache=False).logits[:, :-1]
                outp = model(input_ids=batch, labels=batch, use_cache=False)
                ce = outp.loss.float()
                loss = ce
                if teacher is not None:
                    kd = distillation_loss(outp.logits[:, :-1], teacher, cfg.kd_temperature)
                    loss = kd if cfg.loss == "kd" else kd + cfg.ce_weight * ce
                    sums["kd"] += float(kd.detach()) / cfg.grad_accum
                    del teacher
                dens = masked.densities(cfg.density_estimate, cfg.density_scope)
                if cfg.l1 > 0 and cfg.mode != "maskllm":
                    loss = loss + density_penalty(dens, target, cfg.l1)
                if record:
                    mb = magnitude_bonus(masked.masked_norm_sum(), masked.weight_norm_sum, cfg.l2, step, cfg.steps)
                    loss = loss + mb
                    sums["mag"] += float(mb.detach()) / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                masked.state.clear()
                sums["loss"] += float(loss.detach()) / cfg.grad_accum
                sums["ce"] += float(ce.detach()) / cfg.grad_accum
                sums["density"] += float(dens.detach().mean()) / cfg.grad_accum
            params = masked.parameters()
            finite = torch.tensor([1.0 if math.isfinite(sums["loss"]) else 0.0], device=device)
            if all(p.grad is not None for p in params):
                finite *= float(all(bool(torch.isfinite(local(p.grad)).all()) for p in params))
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not sharded:  # FSDP has reduce-scattered (averaged) the gradients in backward
                    _allreduce_mean([p.grad for p in params if p.grad is not None], world)
            if finite.item() < 1:
                where = (f"the last good checkpoint (step {last_ckpt}) is kept in {out}" if last_ckpt is not None
                         else "no checkpoint was written yet")
                raise TilesparseError(f"loss or gradients became NaN/inf at step {step + 1}; stopped, {where}")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            metrics = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()},
                       "tile_tau": vals["tile_tau"], "pattern_tau": vals["pattern_tau"],
                       "lr": cfg.lr * factor, "seconds": round(time.perf_counter() - t0, 4)}
            history.append(metrics)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", ce=f"{sums['ce']:.3f}", dens=f"{sums['density']:.3f}",
                            tau=f"{vals['tile_tau'] if cfg.mode != 'maskllm' else vals['pattern_tau']:.3g}")
            bar.update(1)
            if out is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                    and step + 1 < cfg.steps:
                save_checkpoint(step + 1)
                last_ckpt = step + 1
            if callback is not None:
                callback(step + 1, metrics)
    finally:
        bar.close()
    if out is not None and (last_ckpt != cfg.steps):
        save_checkpoint(cfg.steps)
    seconds = time.perf_counter() - t_start
    tokens = cfg.steps * cfg.tokens_per_step
    meta = {"method": MODE_NAMES[cfg.mode], "mode": cfg.mode, "model": model_name, "fingerprint": fingerprint,
            "prior": cfg.prior, "steps": cfg.steps, "tokens": tokens, "config": cfg.to_dict()}
    maskset = masked.final_maskset(cfg.sparsity, meta=meta)  # every process: all tiles ranked together
    report = density_report(maskset, masked.block_of)
    report.update({"method": meta["method"], "target_sparsity": maskset.meta["target_sparsity"],
                   "steps": cfg.steps, "tokens": tokens, "seconds": seconds, "logit_bytes": masked.logit_bytes()})
    files = {}
    if out is not None and rank == 0:
        files["masks"] = _save_maskset(maskset, out)
        atomic_write_text(json.dumps({"config": cfg.to_dict(), "report": report, "history": history},
                                     indent=1, default=str), out / "report.json")
        files["report"] = str(out / "report.json")
        files["checkpoint"] = str(out / (CHECKPOINT if layout == SINGLE else dcp_ckpt.DIRNAME))
    return LearnResult(maskset, cfg, history, report, seconds, tokens, out, files,
                       masked.logits_state(rank0_only=sharded), sharded=sharded)


__all__ = [
    "dist_info", "init_distributed_from_env", "warmup_steps", "lr_factor", "WindowSampler", "atomic_torch_save",
    "load_checkpoint", "has_checkpoint", "discard_checkpoint", "iter_initial_logits", "build_initial_logits",
    "LearnResult", "StopRequested", "learn_masks",
]
