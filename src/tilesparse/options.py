"""The values users choose from, defined once; the recipe schema, the CLI and the Python configs use these.

- :data:`PRUNE_METHODS`: one-shot pruners; :data:`CALIBRATED_METHODS` need calibration text.
- :data:`PRUNE_PATTERNS`: what a one-shot pruner produces.
- :data:`LEARN_MODES`: ``joint`` (PATCH-Joint), ``tile`` (PATCH-Tile), ``maskllm`` (learned 2:4 everywhere).
- :data:`PRIORS`: the one-shot method learning starts from, or ``none`` (random initialisation only).
- :data:`RECIPE_KINDS`: the kinds of method in a recipe.
"""

from __future__ import annotations

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "sparsegpt")
PRUNE_PATTERNS = ("unstructured", "2:4", "hybrid")
LEARN_MODES = ("joint", "tile", "maskllm")
PRIORS = (*PRUNE_METHODS, "none")
RECIPE_KINDS = ("dense", "oneshot", "learn")

__all__ = ["PRUNE_METHODS", "CALIBRATED_METHODS", "PRUNE_PATTERNS", "LEARN_MODES", "PRIORS", "RECIPE_KINDS"]
