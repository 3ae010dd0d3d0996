"""Learnable tile-level hybrid masks: PATCH-Joint, PATCH-Tile and learned 2:4 (MaskLLM).

- :mod:`.relax` binary concrete / Gumbel-softmax relaxations and linear schedules (pure math);
- :mod:`.priors` initial logits from one-shot masks (pure) + adapter to :mod:`tilesparse.pruning`;
- :mod:`.regularizers` density and weight-magnitude terms (pure);
- :mod:`.final` argmax 2:4 + exact global tile budget -> :class:`~tilesparse.masks.MaskSet` (pure);
- :mod:`.masked` module swap building each layer's mask inside its forward;
- :mod:`.trainer` the loop (AdamW, accumulation, cosine warm-up, checkpoints, resume, DDP);
- :mod:`.sharded` FSDP2 sharding of the model, the logits and the optimiser state over the processes, and
  :mod:`.sharded_checkpoint` their DCP checkpoints (resumable on another number of processes).
"""

from .config import MODE_NAMES, MODES, LearnConfig, make_config
from .final import build_final_maskset, density_report, format_density_report
from .masked import MaskedLinear, MaskedModel
from .trainer import (LearnResult, StopRequested, discard_checkpoint, has_checkpoint, init_distributed_from_env,
                      learn_masks, load_checkpoint)

__all__ = [
    "MODES", "MODE_NAMES", "LearnConfig", "make_config", "MaskedLinear", "MaskedModel", "learn_masks",
    "LearnResult", "StopRequested", "load_checkpoint", "has_checkpoint", "discard_checkpoint",
    "init_distributed_from_env", "build_final_maskset", "density_report", "format_density_report",
]
