"""tilesparse: learnable tile-level hybrid (dense / 2:4) sparsity for LLMs.

Quick start::

    import tilesparse as ts

    lm = ts.load_model()                                   # the embedded SmolLM2-135M-Instruct
    masks = ts.prune(lm, method="wanda", pattern="hybrid", sparsity=0.35)
    ts.apply_masks(lm, masks)
    print(ts.perplexity(lm, "mobydick"))
    ts.save_masks(masks, "runs/w35")                       # mask only: applies to the base model
    ts.export(lm, masks, "runs/w35-packed")                # packed hybrid model folder; load_model() reads it

Settings can also be given as config objects (``ts.prune(lm, ts.PruneConfig(method="wanda", ...))``).
Learned masks: ``ts.learn(lm, mode="joint", sparsity=0.45, steps=64)``; 4-bit weights after a mask:
``ts.quantize(lm, masks, method="gptq", out_dir="runs/w35-w4")``; a whole recipe:
``ts.run_recipe("recipe.yaml")``. The subpackages (``tilesparse.pruning``, ``.learning``, ``.kernels``...)
hold the lower-level pieces. Settings read from ``TILESPARSE_*`` environment variables: :mod:`tilesparse.settings`.
"""

from .api import (apply_masks, export, learn, load_masks, load_model, perplexity, prune, quantize, refit,
                  run_recipe, save_masks, zeroshot)
from .errors import TilesparseError

__version__ = "0.1.0"

__all__ = ["load_model", "prune", "learn", "refit", "quantize", "apply_masks", "perplexity", "zeroshot", "save_masks",
           "load_masks", "export", "run_recipe", "PruneConfig", "LearnConfig", "QuantConfig", "Recipe", "load_recipe",
           "TilesparseError", "__version__"]

# The config classes live beside torch-heavy modules: imported on first use so that ``import tilesparse``
# stays fast.
_LAZY = {"PruneConfig": "tilesparse.pruning.config", "LearnConfig": "tilesparse.learning.config",
         "QuantConfig": "tilesparse.quant.config",
         "Recipe": "tilesparse.recipe.schema", "load_recipe": "tilesparse.recipe.schema"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tilesparse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
