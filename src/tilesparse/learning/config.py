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

The loss departs from the paper (cross-entropy on the training text): by default it is the KL divergence
from the dense model's own next-token distribution (``loss='kd'``). Measured on the default model (H100,
PATCH-Joint 45 %, 819 k tokens of austen-train, ``benchmarks/results/generalization_h100_austen.md``),
cross-entropy fits the training author and leaves out-of-domain perplexity near the prior (Moby Dick
140.7, Debian Reference 144.9); distillation reaches 98.7 and 73.2 for 2.8 points more in domain.

(*) The paper uses 1e-4 for PATCH-Tile over 2000 steps of about 1 M tokens. At the budgets this library
runs by default (tens to hundreds of steps) that rate leaves the tile logits at their prior: measured on the
default model, 250 steps x 4 k tokens, PATCH-Tile 25 % ends at PPL 42.8 with 1e-4 (the one-shot hybrid's
value) and at 27.9 with 1e-3 (``benchmarks/results/accuracy_h200.md``). Pass ``lr=1e-4`` at the paper's scale.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from ..errors import TilesparseError
from ..options import LEARN_MODES as MODES
from ..options import DensityEstimate, DensityScope, LearnLoss, LearnMode, Prior, Tile, TileMap
from ..typed_config import UserConfig, Pair, check

MODE_NAMES = {"joint": "PATCH-Joint", "tile": "PATCH-Tile", "maskllm": "MaskLLM (learned 2:4)"}

# Fields that must match for a checkpoint to be resumed (anything that changes the trajectory).
IDENTITY_FIELDS = (
    "mode", "sparsity", "steps", "seqlen", "batch", "grad_accum", "tile", "lr", "tile_lr", "warmup",
    "tile_k", "tile_tau", "pattern_k", "pattern_tau", "l1", "l2", "density_scope", "density_estimate",
    "hard_tile", "hard_24", "init_std", "prior", "prior_strength", "calib_samples", "seed", "text",
    "world_size", "dtype", "min_lr_ratio", "max_grad_norm", "loss", "kd_temperature", "ce_weight", "tile_map",
)
# What a saved config without a field meant (fields added after such checkpoints were written).
IDENTITY_DEFAULTS = {"loss": "ce", "kd_temperature": 1.0, "ce_weight": 1.0, "tile_map": "free"}

_BY_MODE = "default by mode"
_NO_CLI = {"cli": False}


class LearnConfig(UserConfig):
    """Everything that defines a mask-learning run (see the module docstring for the defaults).

    Fields left as ``None`` are filled from the mode (and, for the tile temperature, the target sparsity)
    when the config is validated (``shard=None`` is decided by the trainer from the memory it needs). Every field except ``dtype`` and ``world_size`` is also a
    ``tilesparse learn`` option and a recipe key (``methods[i].options``).
    """

    mode: LearnMode = Field("joint", description="joint = PATCH-Joint (learned tiles + learned 2:4), tile = "
                            "PATCH-Tile (learned tiles, fixed one-shot 2:4), maskllm = learned 2:4 everywhere (50 %)")
    sparsity: float = Field(0.45, ge=0.0, le=0.5, description="target sparsity in [0, 0.5] (maskllm: 0.5)")
    steps: int = Field(64, ge=1, description="optimiser steps (64: 15-20 min on 2 idle CPU cores)")
    seqlen: int = Field(256, ge=2, description="tokens per training sequence")
    batch: int = Field(4, ge=1, description="sequences per micro-batch and per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    tile: Tile = Field((128, 128), description="tile size N or ROWSxCOLS (columns a multiple of 4)")
    tile_map: TileMap = Field("free", description="learned tile maps: free (one logit per tile) or columns (one "
                              "logit per tile-column: dense or 2:4 in all its tile-rows); not with --shard")
    lr: float | None = Field(None, gt=0, description="learning rate of the 2:4 pattern logits, and of the tile "
                             "logits unless tile_lr is set (1e-3)")
    tile_lr: float | None = Field(None, gt=0, description="learning rate of the tile logits (default: lr)")
    warmup: float = Field(0.05, ge=0, description="linear warm-up: a fraction of the steps (< 1) or a number "
                          "of steps (>= 1)")
    min_lr_ratio: float = Field(0.0, ge=0, description="final learning rate of the cosine schedule, as a "
                                "fraction of lr")
    tile_k: Pair | None = Field(None, description="tile logit scale schedule START,END (" + _BY_MODE + ")")
    tile_tau: Pair | None = Field(None, description="tile temperature schedule START,END (" + _BY_MODE + ")")
    pattern_k: Pair | None = Field(None, description="2:4 logit scale schedule START,END (100,500)")
    pattern_tau: Pair | None = Field(None, description="2:4 temperature schedule START,END (4,0.05)")
    l1: float | None = Field(None, ge=0, description="density regulariser weight (" + _BY_MODE + ")")
    l2: float | None = Field(None, ge=0, description="weight-magnitude regulariser weight (" + _BY_MODE + ")")
    density_scope: DensityScope = Field("global", description="density regulariser over all layers (global) "
                                        "or per decoder block (block)")
    density_estimate: DensityEstimate = Field("sampled", description="density of the sampled relaxed mask "
                                              "(sampled) or its expectation (expected)")
    hard_tile: bool = Field(False, description="straight-through binary tiles")
    hard_24: bool = Field(False, description="straight-through one-hot 2:4")
    loss: LearnLoss = Field("kd", description="what learning minimises: kd = KL divergence from the dense "
                            "model's next-token distribution (one extra forward of the unmasked model per "
                            "micro-batch), ce = cross-entropy on the training text, kd+ce = kd + ce_weight * ce")
    kd_temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions in kd")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term in kd+ce")
    init_std: float = Field(0.014, ge=0, description="std of the random logit initialisation")
    prior: Prior = Field("sparsegpt", description="one-shot method the logits start from (none = random)")
    prior_strength: float = Field(3.0, ge=0, description="prior strength, in initialisation stds")
    calib_samples: int = Field(32, ge=1, description="calibration segments for the prior")
    calib_seqlen: int = Field(512, ge=1, description="tokens per calibration segment")
    max_grad_norm: float = Field(0.0, ge=0, description="gradient clipping norm (0 = off)")
    seed: int = Field(0, description="seed of the data order, the noise and the initialisation")
    text: str = Field("austen-train", description="training text: a text name or file, self:N (N tokens sampled "
                      "from the dense model itself), or a mixture SOURCE@WEIGHT,... such as "
                      "austen-train@0.5,self:200k@0.5 (evaluation texts are refused)")
    dtype: str = Field("float32", description="dtype of the model during learning", json_schema_extra=_NO_CLI)
    grad_checkpointing: bool = Field(False, description="recompute decoder blocks in backward (less memory)")
    shard: bool | None = Field(None, description="shard the weights, the logits and the optimiser state over the "
                               "processes of a torchrun launch (FSDP2) and write sharded checkpoints that resume "
                               "on any number of processes (default: shard when replicated learning would not "
                               "fit in a GPU's memory)")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0 = at the end only)")
    world_size: int = Field(1, ge=1, description="processes learning together (set by the trainer)",
                            json_schema_extra=_NO_CLI)

    @model_validator(mode="after")
    def _fill(self) -> "LearnConfig":
        if self.mode == "maskllm":
            self.sparsity = 0.5
        check(not (self.tile_map == "columns" and self.shard),
              "tile_map 'columns' is not supported by sharded learning yet (leave --shard off)")
        check(not (self.mode == "tile" and self.prior == "none"),
              "PATCH-Tile needs a one-shot prior for its fixed 2:4 pattern (not 'none')")
        joint, tile = self.mode == "joint", self.mode == "tile"
        if self.tile_k is None:
            self.tile_k = (25.0, 350.0) if joint else (100.0, 500.0)
        if self.tile_tau is None:
            self.tile_tau = ((2.0, 0.05) if self.sparsity < 0.4 else (4.0, 0.05)) if joint else (2.0, 0.05)
        if self.pattern_k is None:
            self.pattern_k = (100.0, 500.0)
        if self.pattern_tau is None:
            self.pattern_tau = (4.0, 0.05)
        if self.l1 is None:
            self.l1 = 3.0 if tile else (7.0 if joint else 0.0)
        if self.l2 is None:
            self.l2 = 0.1 if tile else 10.0
        if self.lr is None:
            self.lr = 1e-3
        for name in ("tile_tau", "pattern_tau"):
            check(min(getattr(self, name)) > 0, f"{name} temperatures must be positive, got {getattr(self, name)}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "LearnConfig":
        """A config from a saved :meth:`to_dict` (keys this version does not know are ignored)."""
        return cls.parse({**IDENTITY_DEFAULTS, **{k: v for k, v in d.items() if k in cls.model_fields}})

    @property
    def tokens_per_step(self) -> int:
        return self.seqlen * self.batch * self.grad_accum * self.world_size

    @property
    def target_density(self) -> float:
        return 0.5 if self.mode == "maskllm" else 1.0 - self.sparsity


def make_config(**overrides: Any) -> LearnConfig:
    """A validated :class:`LearnConfig` with mode-dependent defaults filled in (``None`` = default)."""
    return LearnConfig.parse({k: v for k, v in overrides.items() if v is not None})


def finalize(cfg: LearnConfig) -> LearnConfig:
    """``cfg`` validated again (after attributes were changed), raising :class:`TilesparseError`."""
    return LearnConfig.parse(cfg.model_dump())


# Fields a sharded checkpoint may change on resume, as long as the global batch (sequences per step) stays.
ELASTIC_FIELDS = ("world_size", "batch", "grad_accum")


def global_batch(cfg: dict) -> int:
    """Sequences per optimiser step over all processes of a saved or current config (as a dict)."""
    return int(cfg.get("batch", 1)) * int(cfg.get("grad_accum", 1)) * int(cfg.get("world_size", 1))


def check_resumable(saved: dict, current: LearnConfig, *, elastic: bool = False) -> None:
    """Raise :class:`TilesparseError` naming the first field where a checkpoint's config differs.

    With ``elastic`` (sharded checkpoints) the number of processes, the micro-batch and the accumulation
    may change as long as the global batch, ``world_size * batch * grad_accum``, stays the same.
    """
    cur = current.to_dict()
    if elastic and global_batch(saved) != global_batch(cur):
        raise TilesparseError(
            f"cannot resume: the checkpoint was made with {global_batch(saved)} sequences per step "
            f"(world_size {saved.get('world_size')} x batch {saved.get('batch')} x grad_accum "
            f"{saved.get('grad_accum')}), this run has {global_batch(cur)} (world_size {cur['world_size']} x batch "
            f"{cur['batch']} x grad_accum {cur['grad_accum']}); keep the global batch")
    for k in IDENTITY_FIELDS:
        if elastic and k in ELASTIC_FIELDS:
            continue
        a, b = saved.get(k, IDENTITY_DEFAULTS.get(k)), cur.get(k)
        if a != b:
            raise TilesparseError(f"cannot resume: the checkpoint was made with {k}={a!r}, this run has {k}={b!r}")


__all__ = ["MODES", "MODE_NAMES", "LearnConfig", "make_config", "finalize", "check_resumable", "IDENTITY_FIELDS",
           "ELASTIC_FIELDS", "global_batch"]
