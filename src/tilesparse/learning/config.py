"""Typed configuration of mask learning, with the reference hyper-parameters of PATCH as defaults.

:func:`make_config` fills every value left as ``None`` from the mode (and, for the tile temperature,
the target sparsity) following DESIGN.md section 1:

=========================  ================  ==============  ==============
                           PATCH-Joint       PATCH-Tile      MaskLLM (2:4)
=========================  ================  ==============  ==============
tile scale k               25 -> 350         100 -> 500      (no tiles)
tile temperature tau       4 -> 0.05 (2 ->   2 -> 0.05
                           0.05 at s < 0.4)
2:4 scale k / tau          100 -> 500,       (fixed prior)   100 -> 500,
                           4 -> 0.05                         4 -> 0.05
l1 (density) / l2 (mag.)   7 / 10            3 / 0.1         0 / 10
learning rate              1e-3              1e-3 (*)        1e-3
=========================  ================  ==============  ==============

AdamW (beta2 0.95, no weight decay), cosine schedule with linear warm-up, logits init
``N(0, 0.014^2)``, prior strength 3.

(*) The paper uses 1e-4 for PATCH-Tile over 2000 steps of about 1 M tokens. At the budgets this library
runs by default (tens to hundreds of steps) that rate leaves the tile logits at their prior: measured on the
default model, 250 steps x 4 k tokens, PATCH-Tile 25 % ends at PPL 42.8 with 1e-4 (the one-shot hybrid's
value) and at 27.9 with 1e-3 (``benchmarks/results/accuracy_h200.md``). Pass ``lr=1e-4`` at the paper's scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import TilesparseError
from ..options import LEARN_MODES as MODES
from .priors import PRIOR_METHODS
from .regularizers import DENSITY_ESTIMATES, DENSITY_SCOPES

MODE_NAMES = {"joint": "PATCH-Joint", "tile": "PATCH-Tile", "maskllm": "MaskLLM (learned 2:4)"}

# Fields that must match for a checkpoint to be resumed (anything that changes the trajectory).
IDENTITY_FIELDS = (
    "mode", "sparsity", "steps", "seqlen", "batch", "grad_accum", "tile", "lr", "tile_lr", "warmup",
    "tile_k", "tile_tau", "pattern_k", "pattern_tau", "l1", "l2", "density_scope", "density_estimate",
    "hard_tile", "hard_24", "init_std", "prior", "prior_strength", "calib_samples", "seed", "text",
    "world_size", "dtype", "min_lr_ratio", "max_grad_norm",
)


@dataclass
class LearnConfig:
    """Everything that defines a mask-learning run (see the module docstring for the defaults)."""

    mode: str = "joint"
    sparsity: float = 0.45
    steps: int = 64  # CPU default: about 15 min on an idle 2-core CPU with the SparseGPT prior (see docs)
    seqlen: int = 256
    batch: int = 4  # sequences per micro-batch and per process
    grad_accum: int = 1
    tile: tuple[int, int] = (128, 128)
    lr: float | None = None  # 2:4 pattern logits (and tile logits unless tile_lr is set)
    tile_lr: float | None = None
    warmup: float = 0.05  # fraction of steps (< 1) or number of steps (>= 1)
    min_lr_ratio: float = 0.0
    tile_k: tuple[float, float] | None = None
    tile_tau: tuple[float, float] | None = None
    pattern_k: tuple[float, float] | None = None
    pattern_tau: tuple[float, float] | None = None
    l1: float | None = None
    l2: float | None = None
    density_scope: str = "global"
    density_estimate: str = "sampled"
    hard_tile: bool = False
    hard_24: bool = False
    init_std: float = 0.014
    prior: str = "sparsegpt"
    prior_strength: float = 3.0
    calib_samples: int = 32
    calib_seqlen: int = 512
    max_grad_norm: float = 0.0  # 0 = no clipping
    seed: int = 0
    text: str = "austen-train"
    dtype: str = "float32"
    grad_checkpointing: bool = False
    checkpoint_every: int = 50
    world_size: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tile"] = list(self.tile)
        for k in ("tile_k", "tile_tau", "pattern_k", "pattern_tau"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LearnConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("tile", "tile_k", "tile_tau", "pattern_k", "pattern_tau"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    @property
    def tokens_per_step(self) -> int:
        return self.seqlen * self.batch * self.grad_accum * self.world_size

    @property
    def target_density(self) -> float:
        return 0.5 if self.mode == "maskllm" else 1.0 - self.sparsity


def make_config(**overrides) -> LearnConfig:
    """A validated :class:`LearnConfig` with mode-dependent defaults filled in (``None`` = default)."""
    cfg = LearnConfig(**{k: v for k, v in overrides.items() if v is not None})
    return finalize(cfg)


def finalize(cfg: LearnConfig) -> LearnConfig:
    """Validate ``cfg`` (raising :class:`TilesparseError` for user mistakes) and fill its defaults."""
    if cfg.mode not in MODES:
        raise TilesparseError(f"unknown learning mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(cfg.sparsity, (int, float)) or not 0.0 <= float(cfg.sparsity) <= 0.5:
        raise TilesparseError(f"sparsity must lie in [0, 0.5] (hybrid dense/2:4), got {cfg.sparsity}")
    if cfg.mode == "maskllm":
        cfg.sparsity = 0.5
    if int(cfg.steps) < 1:
        raise TilesparseError(f"steps must be at least 1, got {cfg.steps}")
    for name in ("seqlen", "batch", "grad_accum", "calib_samples", "calib_seqlen", "world_size"):
        if int(getattr(cfg, name)) < 1:
            raise TilesparseError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.seqlen < 2:
        raise TilesparseError(f"seqlen must be at least 2, got {cfg.seqlen}")
    if cfg.checkpoint_every < 0:
        raise TilesparseError(f"checkpoint interval must be >= 0, got {cfg.checkpoint_every}")
    if len(cfg.tile) != 2 or min(cfg.tile) <= 0 or cfg.tile[1] % 4:
        raise TilesparseError(f"tile must be two positive sizes with columns a multiple of 4, got {cfg.tile}")
    if cfg.prior not in PRIOR_METHODS:
        raise TilesparseError(f"unknown prior {cfg.prior!r}; choose one of {', '.join(PRIOR_METHODS)}")
    if cfg.mode == "tile" and cfg.prior == "none":
        raise TilesparseError("PATCH-Tile needs a one-shot prior for its fixed 2:4 pattern (not 'none')")
    if cfg.density_scope not in DENSITY_SCOPES:
        raise TilesparseError(f"density scope must be one of {', '.join(DENSITY_SCOPES)}")
    if cfg.density_estimate not in DENSITY_ESTIMATES:
        raise TilesparseError(f"density estimate must be one of {', '.join(DENSITY_ESTIMATES)}")
    if cfg.warmup < 0 or cfg.init_std < 0 or cfg.prior_strength < 0 or cfg.max_grad_norm < 0:
        raise TilesparseError("warmup, init std, prior strength and max grad norm must be >= 0")
    joint, tile = cfg.mode == "joint", cfg.mode == "tile"
    if cfg.tile_k is None:
        cfg.tile_k = (25.0, 350.0) if joint else (100.0, 500.0)
    if cfg.tile_tau is None:
        cfg.tile_tau = ((2.0, 0.05) if cfg.sparsity < 0.4 else (4.0, 0.05)) if joint else (2.0, 0.05)
    if cfg.pattern_k is None:
        cfg.pattern_k = (100.0, 500.0)
    if cfg.pattern_tau is None:
        cfg.pattern_tau = (4.0, 0.05)
    if cfg.l1 is None:
        cfg.l1 = 3.0 if tile else (7.0 if joint else 0.0)
    if cfg.l2 is None:
        cfg.l2 = 0.1 if tile else 10.0
    if cfg.lr is None:
        cfg.lr = 1e-3
    for name in ("tile_tau", "pattern_tau"):
        if min(getattr(cfg, name)) <= 0:
            raise TilesparseError(f"{name} temperatures must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or (cfg.tile_lr is not None and cfg.tile_lr <= 0):
        raise TilesparseError("learning rates must be positive")
    cfg.sparsity = float(cfg.sparsity)
    cfg.tile = (int(cfg.tile[0]), int(cfg.tile[1]))
    for name in ("tile_k", "tile_tau", "pattern_k", "pattern_tau"):
        setattr(cfg, name, tuple(float(x) for x in getattr(cfg, name)))
    return cfg


def check_resumable(saved: dict, current: LearnConfig) -> None:
    """Raise :class:`TilesparseError` naming the first field where a checkpoint's config differs."""
    cur = current.to_dict()
    for k in IDENTITY_FIELDS:
        a, b = saved.get(k), cur.get(k)
        if a != b:
            raise TilesparseError(f"cannot resume: the checkpoint was made with {k}={a!r}, this run has {k}={b!r}")


__all__ = ["MODES", "MODE_NAMES", "LearnConfig", "make_config", "finalize", "check_resumable", "IDENTITY_FIELDS"]
