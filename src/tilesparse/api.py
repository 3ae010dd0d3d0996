"""The public API: load a model, prune it in one shot or learn its masks, evaluate, export, run a recipe.

Every function takes the :class:`~tilesparse.models.LoadedModel` that :func:`load_model` returns (a
model, its tokenizer and its name). Masks are :class:`~tilesparse.masks.MaskSet` objects: they apply to
the unmodified base model and are saved as small mask-only artifacts. Bad input raises
:class:`~tilesparse.errors.TilesparseError` with a one-line message. The heavy libraries are imported
when a function is first called, so ``import tilesparse`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path


def load_model(model: str | os.PathLike | None = None, *, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM and its tokenizer: an HF model folder, a ``.gguf`` file, a packed export
    (``export``), a hub id when the hub is reachable, or ``None`` for the embedded default model
    (SmolLM2-135M-Instruct, fetched into the cache on first use). Returns a ``LoadedModel``."""
    from .models import load_model as _load

    return _load(model, dtype=dtype, device=device)


def _config(cls, config, settings: dict, what: str):
    from .errors import TilesparseError

    if config is None:
        return cls(**settings)
    if not isinstance(config, cls):
        raise TilesparseError(f"{what} takes a {cls.__name__}, got {type(config).__name__}")
    if settings:
        raise TilesparseError(f"{what}: give a {cls.__name__} or its settings as keywords ({', '.join(settings)}), "
                              "not both")
    return config


def prune(model, config=None, *, calibration: str = "austen-train", samples: int = 32, seqlen: int = 512,
          seed: int = 0, progress: bool = True, **settings):
    """One-shot masks for every linear layer inside the decoder blocks; returns a ``MaskSet``.

    ``config`` is a :class:`~tilesparse.pruning.PruneConfig`, or give its settings as keywords:
    ``method`` (``magnitude``, ``wanda``, ``sparsegpt``), ``pattern`` (``unstructured`` with any
    ``sparsity`` in [0, 1), ``2:4`` = 50 %, or ``hybrid``: dense and 2:4 tiles, ``sparsity`` in [0, 0.5]),
    ``tile``, ``update_weights`` (SparseGPT keeps its reconstruction in the model; otherwise the weights
    are left as they were). ``calibration`` is a text name or file (``samples`` x ``seqlen`` tokens).
    """
    from .pruning import PruneConfig, prune_text

    cfg = _config(PruneConfig, config, settings, "prune")
    return prune_text(model, cfg, calibration, samples, seqlen, seed, progress=progress)


def learn(model, config=None, *, out_dir: str | os.PathLike | None = None, progress: bool = True, **settings):
    """Learn masks with the weights frozen (PATCH); returns a ``LearnResult`` whose ``maskset`` is the
    final binary mask and ``prior`` the one-shot mask learning started from.

    ``config`` is a :class:`~tilesparse.learning.LearnConfig`, or give its settings as keywords:
    ``mode`` (``joint``: tiles and 2:4 patterns learned, ``tile``: tiles learned with the one-shot 2:4
    kept, ``maskllm``: learned 2:4 everywhere), ``sparsity`` (default 0.45), ``text`` (the training text,
    a name or a file; evaluation texts are refused), ``prior`` (``sparsegpt``, ``wanda``, ``magnitude``
    or ``none``), ``steps``, ``batch``, ``seqlen``, ``lr``, ``tile``... With ``out_dir`` the run writes
    checkpoints there and can be resumed with the CLI's ``--resume``.
    """
    from .data import check_training_source, training_tokens
    from .learning import LearnConfig, learn_masks
    from .options import CALIBRATED_METHODS
    from .pruning import calibration_ids

    from .quant.state import check_not_quantized

    cfg = _config(LearnConfig, config, settings, "learn")
    check_not_quantized(model.model, "learn")
    check_training_source(cfg.text)
    calib = None
    if cfg.prior in CALIBRATED_METHODS:
        calib, _ = calibration_ids(model, cfg.text, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
    ids = training_tokens(model, cfg.text, seed=cfg.seed, progress=progress)
    return learn_masks(model.model, cfg, ids, out_dir=out_dir, model_name=model.name, calib_ids=calib,
                       progress=progress, bos_id=model.bos_id)


def refit(model, masks, *, keep: str = "mask", calibration: str = "austen-train", samples: int = 32,
          seqlen: int = 512, seed: int = 0, progress: bool = True) -> dict:
    """Reconstruct the kept weights for a learned mask with SparseGPT's layer-wise update: the model's
    prunable weights are replaced in place, zero where pruned. ``keep="mask"`` keeps the mask exactly;
    ``keep="tiles"`` keeps its tile map and lets SparseGPT choose the 2:4 pattern of each group as it
    updates (better after short learning runs, whose patterns are close to the prior). Use it after
    ``learn`` (``info = ts.refit(lm, res.maskset)``), then ``ts.export(lm, info["maskset"], ...)`` ships the
    refitted weights. ``calibration`` is a text name, file, ``self:N`` or mixture (``samples`` x ``seqlen``
    tokens). Returns the mask now in the model (``"maskset"``), per-layer details and the time taken."""
    from .pruning import calibration_ids, refit_weights

    calib, _ = calibration_ids(model, calibration, samples, seqlen, seed)
    return refit_weights(model.model, calib, masks, keep=keep, progress=progress)


def quantize(model, masks=None, config=None, *, calibration: str = "austen-train", samples: int = 32,
             seqlen: int = 512, seed: int = 0, out_dir: str | os.PathLike | None = None, progress: bool = True,
             **settings):
    """Weight-only group-wise quantization of every prunable linear, after ``masks`` (fake-quant: the
    model's weights are replaced in place by their dequantized values). Returns a ``ModelQuantization``
    (integer codes, bfloat16 scales and zero points per layer).

    ``config`` is a :class:`~tilesparse.quant.QuantConfig`, or give its settings as keywords: ``method``
    (``gptq``, calibrated on ``calibration`` with ``samples`` x ``seqlen`` tokens, or ``rtn``: round to
    nearest), ``bits`` (2, 3, 4 or 8; default 4), ``group_size`` (weights per scale along the input
    dimension, default 128), ``symmetric`` (default ``True``), ``observer`` (``minmax``, or ``mse``: each group's
    range shrunk to round it with the smallest error), ``act_order`` (GPTQ: columns by decreasing Hessian
    diagonal, static groups). With ``masks`` the pruned weights are zeroed
    and stay exactly 0, and do not count in their group's scale. ``out_dir`` writes the mask, the
    dequantized weights and the codes there (``tilesparse eval --mask out_dir`` scores it). Quantize last:
    a quantized model is refused by ``learn`` and by ``quantize`` itself.
    """
    from .quant import QuantConfig, check_not_quantized, quantize_model

    cfg = _config(QuantConfig, config, settings, "quantize")
    check_not_quantized(model.model, "quantize")
    calib, desc = None, None
    if cfg.needs_calibration:
        from .pruning import calibration_ids

        calib, desc = calibration_ids(model, calibration, samples, seqlen, seed)
    res = quantize_model(model.model, cfg, masks, calib, progress=progress)
    if desc is not None:
        res.meta["calibration"] = desc
    if out_dir is not None:
        from .io.quantized import save_quantized_artifact

        res.meta["files"] = save_quantized_artifact(model.model, res, masks, out_dir, model_name=model.name)
    return res


def apply_masks(model, masks) -> None:
    """Zero the masked weights of ``model`` in place (the dense model stays dense elsewhere)."""
    from .io import apply_masks as _apply

    _apply(model.model, masks)


def perplexity(model, text: str = "prideprejudice", *, seqlen: int = 512, windows: int | None = 10,
               batch_size: int = 4, progress: bool = True):
    """Perplexity on a text (an embedded name such as ``mobydick``, or a file) under the pinned protocol:
    non-overlapping windows from the start, ``exp(mean NLL)``. Returns a ``PerplexityResult``."""
    from .evaluation import evaluate_text

    return evaluate_text(model, text, seqlen=seqlen, max_windows=windows, batch_size=batch_size, progress=progress)


def zeroshot(model, tasks: list[str] | str | None = None, *, limit: int | None = None, batch_size: int = 8,
             device: str | None = None):
    """Zero-shot accuracy through lm-eval (the offline tasks, and lm-eval's standard tasks when their
    data can be reached; the others are listed in ``result.unavailable`` with the reason)."""
    from .evaluation.zeroshot import run_zeroshot

    return run_zeroshot(model, tasks, limit=limit, batch_size=batch_size, device=device)


def save_masks(masks, path: str | os.PathLike) -> Path:
    """Write a mask-only artifact (``path/masks.safetensors``, or the ``.safetensors`` path given)."""
    from .io import save_mask_artifact

    return save_mask_artifact(masks, path)


def load_masks(path: str | os.PathLike, model=None):
    """Read a mask artifact; with ``model`` (a ``LoadedModel``), check it was made for those weights."""
    from .io import load_mask_artifact

    return load_mask_artifact(path, model.model if model is not None else None)


def export(model, masks, out_dir: str | os.PathLike, *, tile: int | str | tuple[int, int] | None = None) -> dict:
    """Pack ``model`` with ``masks`` into a folder that ships (bf16 hybrid weights, config, tokenizer),
    load it back and compare; returns the file sizes and the check. The model's linears are replaced by
    packed layers in place: load the model again to keep working with the dense one."""
    from .io.export import export_packed
    from .pruning import parse_tile

    apply_masks(model, masks)
    shape = parse_tile(tile) if tile is not None else next(iter(masks)).tile
    return export_packed(model, masks, out_dir, tile=shape)


def run_recipe(recipe: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None, *,
               progress: bool = True):
    """Run a recipe YAML (``None``: the packaged default) end to end, reusing finished stages; returns
    the per-run results and writes ``report.md`` and ``results.json`` in the output folder."""
    from .recipe import default_recipe_path, load_recipe
    from .recipe import run_recipe as _run

    return _run(load_recipe(recipe or default_recipe_path()), out_dir, progress=progress)


__all__ = ["load_model", "prune", "learn", "quantize", "apply_masks", "perplexity", "zeroshot", "save_masks", "load_masks",
           "export", "run_recipe"]
