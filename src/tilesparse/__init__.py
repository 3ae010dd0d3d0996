"""tilesparse: learnable tile-level hybrid (dense / 2:4) sparsity for LLMs.

Quick start::

    import tilesparse as ts

    lm = ts.load_model()                                   # the embedded SmolLM2-135M-Instruct
    masks = ts.prune(lm, method="wanda", pattern="hybrid", sparsity=0.35)
    ts.apply_masks(lm, masks)
    print(ts.perplexity(lm, "mobydick"))
    ts.save_masks(masks, "runs/w35")                       # mask only: applies to the base model
    ts.export(lm, masks, "runs/w35-packed")                # packed hybrid model folder; load_model() reads it

Learned masks: ``ts.learn(lm, mode="joint", sparsity=0.45, steps=64)``; a whole recipe:
``ts.run_recipe("recipe.yaml")``. The subpackages (``tilesparse.pruning``, ``.learning``, ``.kernels``...)
hold the lower-level pieces. Settings read from the environment:

- ``TILESPARSE_CACHE``: the cache folder (default ``~/.cache/tilesparse``): model, texts, task files;
- ``TILESPARSE_BIGBENCH_SDIST``: a local ``bigbench-1.0.0.tar.gz`` that enables the ``bb_*`` zero-shot
  tasks (never downloaded);
- GPU kernels: ``TILESPARSE_MMA=0`` (no CUDA sparse-tensor-core kernels, Triton only: for a model spread
  over several GPUs), ``TILESPARSE_PDL=1`` (dependent launches on sm_90), ``TILESPARSE_AUTOTUNE=0`` (no
  autotuning), ``TILESPARSE_FLAT`` / ``TILESPARSE_STREAM`` (which Triton kernels are candidates);
- learning on a GPU: ``TILESPARSE_FUSED_MASK`` (``0``, ``1`` or ``auto``: the fused Triton mask kernels)
  and ``TILESPARSE_FUSED_BLOCKS`` (their block sizes).
"""

from .api import (apply_masks, export, learn, load_masks, load_model, perplexity, prune, run_recipe, save_masks,
                  zeroshot)
from .errors import TilesparseError

__version__ = "0.1.0"

__all__ = ["load_model", "prune", "learn", "apply_masks", "perplexity", "zeroshot", "save_masks", "load_masks",
           "export", "run_recipe", "TilesparseError", "__version__"]
