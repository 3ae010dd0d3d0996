"""Mask-learning loop: AdamW on the logits only, gradient accumulation, cosine LR with warm-up,
atomic checkpoints with bit-exact resume, NaN guard, and data-parallel training through
``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPUs).

Orchestration only; the math lives in :mod:`.relax`, :mod:`.regularizers`, :mod:`.priors`, :mod:`.final`.

Determinism: the data order is a pure function of (seed, step); the noise comes from the global torch
RNG seeded with ``seed + rank`` and saved in every checkpoint together with the optimiser state and
the logits, so an interrupted run resumed from its last checkpoint ends with the same logits as an
uninterrupted one.
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
from .masked import MaskedModel
from .priors import (OneShotMasks, init_logits, one_shot_masks, one_shot_prior, pattern_prior_logits,
                     prior_maskset, tile_prior_logits)
from ..atomic import atomic_torch_save, atomic_write_text
from .regularizers import density_penalty, distillation_loss, magnitude_bonus, magnitude_decay
from .relax import LinearSchedule

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "tilesparse-learn-checkpoint"
CHECKPOINT_VERSION = 1
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


def load_checkpoint(directory: str | os.PathLike) -> dict:
    """Read a learning checkpoint (raising :class:`TilesparseError` for anything that is not one)."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise TilesparseError(f"no learning checkpoint in {directory} (expected {CHECKPOINT})")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TilesparseError(f"{path} is not a readable checkpoint: {str(exc).splitlines()[0]}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise TilesparseError(f"{path} is not a tilesparse learning checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise TilesparseError(f"{path}: checkpoint version {ck.get('version')} is not supported")
    return ck


def discard_checkpoint(out_dir: str | os.PathLike) -> int:
    """Delete the resumable state of a finished run in ``out_dir`` (checkpoint and its JSON note);
    returns the bytes freed. The masks, the prior and the report stay."""
    freed = 0
    for name in (CHECKPOINT, "checkpoint.json"):
        path = Path(out_dir) / name
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
    return freed


# -- priors ----------------------------------------------------------------------------------
def build_initial_logits(model: nn.Module, cfg: LearnConfig, calib_ids: torch.Tensor | None,
                         progress: bool = False, prior_masks: OneShotMasks | None = None
                         ) -> tuple[dict, dict, dict]:
    """Initial tile logits, pattern logits and fixed ids per layer: ``N(0, std^2)`` + the one-shot prior.

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
    tiles, patterns, ids = {}, {}, {}
    from ..masks.nm import ids_from_mask

    for lin in linears:
        grid = TileGrid(lin.out_features, lin.in_features, *cfg.tile)
        if need_tiles:
            t = init_logits(grid.shape, cfg.init_std, gen)
            if lin.name in shots.unstructured and cfg.prior_strength > 0:
                t = t + tile_prior_logits(shots.unstructured[lin.name].cpu(), grid, cfg.sparsity,
                                          std=cfg.init_std, strength=cfg.prior_strength)
            tiles[lin.name] = t
        if cfg.mode in ("joint", "maskllm"):
            p = init_logits((lin.out_features, lin.in_features // 4, 6), cfg.init_std, gen)
            if lin.name in shots.two_four and cfg.prior_strength > 0:
                p = p + pattern_prior_logits(shots.two_four[lin.name].cpu(), std=cfg.init_std,
                                             strength=cfg.prior_strength)
            patterns[lin.name] = p
        else:
            if lin.name not in shots.two_four:
                raise TilesparseError(f"{lin.name}: the {cfg.prior} prior gave no 2:4 mask for PATCH-Tile")
            ids[lin.name] = ids_from_mask(shots.two_four[lin.name].cpu())
    return tiles, patterns, ids


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
    prior: object = None  # the one-shot prior as a binary MaskSet (what learning started from), if any


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
    if resume:
        if out is None:
            raise TilesparseError("resuming needs the run's output directory")
        ck = load_checkpoint(out)
        check_resumable(ck["config"], cfg)
        if ck.get("fingerprint") != fingerprint:
            raise TilesparseError(f"cannot resume: the checkpoint in {out} was made for another model "
                                  f"({ck.get('model')}, weights {ck.get('fingerprint')} vs {fingerprint})")
    t_start = time.perf_counter()

    prior = None
    if ck is None:
        if prior_masks is None:
            prior_masks = one_shot_prior(model, calib_ids, method=cfg.prior, mode=cfg.mode, sparsity=cfg.sparsity,
                                         progress=progress and rank == 0)
        tiles, patterns, ids = build_initial_logits(model, cfg, calib_ids, prior_masks=prior_masks)
        if prior_masks.two_four:
            prior = prior_maskset(prior_masks, find_prunable_linears(model), cfg.mode, cfg.sparsity, cfg.tile,
                                  meta={"model": model_name, "fingerprint": fingerprint})
            if out is not None and rank == 0:
                _save_maskset(prior, out / PRIOR_DIR)
    else:
        if out is not None and (out / PRIOR_DIR).is_dir():
            from ..io import load_mask_artifact

            prior = load_mask_artifact(out / PRIOR_DIR)
        split = {"tile": {}, "pattern": {}, "ids": {}}
        for key, t in ck["logits"].items():
            name, _, kind = key.rpartition(":")
            split.setdefault(kind, {})[name] = t
        tiles, ids = split["tile"], split["ids"]
        patterns = {k: v.permute(1, 2, 0) for k, v in split["pattern"].items()}  # stored candidate-major
    masked = MaskedModel(model, cfg.mode, tile=cfg.tile, tile_init=tiles, pattern_init=patterns, ids=ids)
    try:
        res = _train(model, masked, cfg, train_ids, ck, out, rank, world, device, fingerprint, model_name,
                     progress, callback, t_start, bos_id)
        res.prior = prior
        return res
    finally:
        masked.remove()


def _train(model, masked: MaskedModel, cfg: LearnConfig, train_ids, ck, out, rank, world, device, fingerprint,
           model_name, progress, callback, t_start, bos_id) -> LearnResult:
    if ck is not None:
        masked.load_logits_state(ck["logits"])
    elif world > 1:  # every rank starts from rank 0's logits
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
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        history = list(ck.get("history", []))
        rngs = ck["rng"]
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
        if rank == 0 and ckpt_path is not None:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg.to_dict(),
                "model": model_name, "fingerprint": fingerprint, "step": next_step,
                "samples_seen": next_step * per_step, "logits": masked.logits_state(),
                "optimizer": opt.state_dict(), "rng": rngs, "history": history,
            }, ckpt_path)
            atomic_write_text(json.dumps({"step": next_step, "steps": cfg.steps, "mode": cfg.mode,
                                          "model": model_name}, indent=1), out / "checkpoint.json")

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
                              record_norms=record)
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
            finite = torch.tensor([1.0 if math.isfinite(sums["loss"]) else 0.0])
            if all(p.grad is not None for p in params):
                finite *= float(all(bool(torch.isfinite(p.grad).all()) for p in params))
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
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
    maskset = masked.final_maskset(cfg.sparsity, meta=meta)
    report = density_report(maskset, masked.block_of)
    report.update({"method": meta["method"], "target_sparsity": maskset.meta["target_sparsity"],
                   "steps": cfg.steps, "tokens": tokens, "seconds": seconds, "logit_bytes": masked.logit_bytes()})
    files = {}
    if out is not None and rank == 0:
        files["masks"] = _save_maskset(maskset, out)
        atomic_write_text(json.dumps({"config": cfg.to_dict(), "report": report, "history": history},
                                     indent=1, default=str), out / "report.json")
        files["report"] = str(out / "report.json")
        files["checkpoint"] = str(out / CHECKPOINT)
    return LearnResult(maskset, cfg, history, report, seconds, tokens, out, files, masked.logits_state())


__all__ = [
    "dist_info", "init_distributed_from_env", "warmup_steps", "lr_factor", "WindowSampler", "atomic_torch_save",
    "load_checkpoint", "discard_checkpoint", "build_initial_logits", "LearnResult", "StopRequested", "learn_masks",
]
