"""The values users choose from, defined once as types; the recipe schema, the CLI choices and the Python
configs are built from these.

- :data:`PruneMethod`: one-shot pruners; :data:`CALIBRATED_METHODS` need calibration text.
- :data:`PrunePattern`: what a one-shot pruner produces.
- :data:`LearnMode`: ``joint`` (PATCH-Joint), ``tile`` (PATCH-Tile), ``maskllm`` (learned 2:4 everywhere).
- :data:`Prior`: the one-shot method learning starts from, or ``none`` (random initialisation only).
- :data:`DensityScope`, :data:`DensityEstimate`: how the density regulariser measures density.
- :data:`RecipeKind`: the kinds of method in a recipe.
- :data:`LearnLoss`: what mask learning minimises: ``ce`` (next-token cross-entropy on the training text),
  ``kd`` (KL divergence from the dense model's next-token distribution), ``kd+ce`` (both).

Each type's values are also available as a tuple (``PRUNE_METHODS`` ...).
"""

from __future__ import annotations

from typing import Literal, get_args

PruneMethod = Literal["magnitude", "wanda", "sparsegpt"]
PrunePattern = Literal["unstructured", "2:4", "hybrid"]
LearnMode = Literal["joint", "tile", "maskllm"]
Prior = Literal[PruneMethod, "none"]
DensityScope = Literal["global", "block"]
DensityEstimate = Literal["sampled", "expected"]
RecipeKind = Literal["dense", "oneshot", "learn"]
LearnLoss = Literal["ce", "kd", "kd+ce"]

PRUNE_METHODS: tuple[str, ...] = get_args(PruneMethod)
CALIBRATED_METHODS: tuple[str, ...] = ("wanda", "sparsegpt")
PRUNE_PATTERNS: tuple[str, ...] = get_args(PrunePattern)
LEARN_MODES: tuple[str, ...] = get_args(LearnMode)
PRIORS: tuple[str, ...] = get_args(Prior)
DENSITY_SCOPES: tuple[str, ...] = get_args(DensityScope)
DENSITY_ESTIMATES: tuple[str, ...] = get_args(DensityEstimate)
RECIPE_KINDS: tuple[str, ...] = get_args(RecipeKind)
LEARN_LOSSES: tuple[str, ...] = get_args(LearnLoss)

__all__ = ["PruneMethod", "PrunePattern", "LearnMode", "Prior", "DensityScope", "DensityEstimate", "RecipeKind",
           "LearnLoss", "PRUNE_METHODS", "CALIBRATED_METHODS", "PRUNE_PATTERNS", "LEARN_MODES", "PRIORS",
           "DENSITY_SCOPES", "DENSITY_ESTIMATES", "RECIPE_KINDS", "LEARN_LOSSES"]
