"""The stage functions of a recipe run: build a mask, evaluate it, export the packed model.

Each takes the :class:`~tilesparse.recipe.runner.RecipeRunner` (for the model and the recipe) and
returns a JSON-serialisable dict of details; the runner handles fingerprints and skipping.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import TilesparseError
from ..io.export import apply_mask_dir, export_packed, save_updated_weights
from ..learning.trainer import PRIOR_DIR
from ..options import CALIBRATED_METHODS
from .schema import learn_config


def _calibration(runner, loaded):
    from ..pruning import calibration_ids

    d = runner.recipe.data
    return calibration_ids(loaded, d.calibration, d.calib_samples, d.calib_seqlen, d.seed)


def make_mask(runner, spec, mask_dir: Path) -> dict:
    """Build the mask of one run into ``mask_dir``; returns details (measured sparsity, timings...)."""
    mask_dir.mkdir(parents=True, exist_ok=True)
    m = spec.method
    if m.kind == "dense":
        return {"measured_sparsity": 0.0}
    loaded = runner.model()
    if spec.role == "prior":
        return _prior(runner, loaded, spec, mask_dir)
    if spec.role == "refit":
        return _refit(runner, loaded, spec, mask_dir)
    if m.kind == "oneshot":
        return _oneshot(runner, loaded, spec, mask_dir)
    return _learned(runner, loaded, spec, mask_dir)


def _oneshot(runner, loaded, spec, mask_dir: Path) -> dict:
    from ..io import save_mask_artifact
    from ..pruning import PruneConfig, prune_text

    m, d = spec.method, runner.recipe.data
    cfg = PruneConfig(method=m.method, pattern=m.pattern, sparsity=spec.target, tile=runner.recipe.tile_shape,
                      update_weights=m.update_weights)
    ms = prune_text(loaded, cfg, d.calibration, d.calib_samples, d.calib_seqlen, d.seed, progress=runner.progress)
    save_mask_artifact(ms, mask_dir)
    if m.update_weights:
        save_updated_weights(loaded.model, mask_dir)
        runner.restore()
    return {"measured_sparsity": ms.sparsity(), "per_layer": ms.per_layer()}


def _learned(runner, loaded, spec, mask_dir: Path) -> dict:
    from ..data import training_tokens
    from ..io import save_mask_artifact
    from ..learning.final import density_report
    from ..learning.trainer import discard_checkpoint, has_checkpoint, learn_masks
    from ..models import find_prunable_linears

    d = runner.recipe.data
    cfg = learn_config(runner.recipe, spec.method, spec.target)
    train_ids = training_tokens(loaded, d.train, seed=d.seed, progress=runner.progress)
    calib = None
    if cfg.prior in CALIBRATED_METHODS:
        calib, _ = _calibration(runner, loaded)
    # checkpoints live beside the mask so an interrupted run resumes; checkpoints of an earlier,
    # different version of this stage (another fingerprint) are discarded instead of resumed
    work = mask_dir.parent / "learn"
    fp_file = work / "stage-fingerprint"
    fp = runner.mask_fingerprint(spec)
    if work.exists() and (not fp_file.is_file() or fp_file.read_text().strip() != fp):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fp)
    resume = has_checkpoint(work)
    res = learn_masks(loaded.model, cfg, train_ids, out_dir=work, resume=resume, model_name=loaded.name,
                      calib_ids=calib, progress=runner.progress, bos_id=loaded.bos_id)
    ms = res.maskset
    save_mask_artifact(ms, mask_dir)
    if res.prior is not None:
        save_mask_artifact(res.prior, mask_dir / PRIOR_DIR)
    if not runner.recipe.keep_checkpoints:
        discard_checkpoint(work)
    block_of = {l.name: l.block_index for l in find_prunable_linears(loaded.model)}
    return {"measured_sparsity": ms.sparsity(), "per_layer": ms.per_layer(),
            "density": density_report(ms, block_of), "steps": cfg.steps, "tokens": res.tokens,
            "learn_seconds": res.seconds, "config": cfg.to_dict()}


def _prior(runner, loaded, spec, mask_dir: Path) -> dict:
    """The one-shot prior a learned run starts from, as a mask: saved by the learned run's stage, or
    computed here when that stage is older than this record (same pruner, same calibration)."""
    from ..io import load_mask_artifact, save_mask_artifact
    from ..learning.priors import one_shot_prior, prior_maskset
    from ..models import find_prunable_linears

    learned = runner.out / "stages" / spec.learned_run_id / "mask" / PRIOR_DIR
    if (learned / "masks.safetensors").is_file():
        ms = load_mask_artifact(learned)
    else:
        cfg = learn_config(runner.recipe, spec.method, spec.target)
        calib = _calibration(runner, loaded)[0] if cfg.prior in CALIBRATED_METHODS else None
        shots = one_shot_prior(loaded.model, calib, method=cfg.prior, mode=cfg.mode, sparsity=cfg.sparsity,
                               progress=runner.progress)
        ms = prior_maskset(shots, find_prunable_linears(loaded.model), cfg.mode, cfg.sparsity, cfg.tile,
                           meta={"model": loaded.name})
    save_mask_artifact(ms, mask_dir)
    return {"measured_sparsity": ms.sparsity(), "per_layer": ms.per_layer(), "prior": spec.method.prior}


def _refit(runner, loaded, spec, mask_dir: Path) -> dict:
    """The learned run's masks (or, ``refit: tiles``, its tile map) with the kept weights refitted by
    SparseGPT's update (calibration data)."""
    from ..io import load_mask_artifact, save_mask_artifact
    from ..pruning import refit_weights

    ms = load_mask_artifact(runner.out / "stages" / spec.learned_run_id / "mask", loaded.model)
    calib, _ = _calibration(runner, loaded)
    info = refit_weights(loaded.model, calib, ms, keep=spec.method.refit_keep, progress=runner.progress)
    ms = info["maskset"]
    save_mask_artifact(ms, mask_dir)
    save_updated_weights(loaded.model, mask_dir)
    runner.restore()
    return {"measured_sparsity": ms.sparsity(), "per_layer": ms.per_layer(), "refit_seconds": info["seconds"],
            "fallback_layers": info["fallback_layers"]}


def quantize_run(runner, spec, mask_dir: Path, quant_dir: Path) -> dict:
    """Quantize the run's model (its mask and updated weights applied) as the recipe's ``quantize`` says, and
    save the mask, the dequantized weights and the codes into ``quant_dir``."""
    from ..io.quantized import save_quantized_artifact
    from ..quant import quantize_model

    cfg = runner.recipe.quantize.to_config()
    loaded, ms = apply_run(runner, spec, mask_dir)
    calib = _calibration(runner, loaded)[0] if cfg.needs_calibration else None
    res = quantize_model(loaded.model, cfg, ms, calib, progress=runner.progress)
    save_quantized_artifact(loaded.model, res, ms, quant_dir, model_name=loaded.name)
    runner.restore()
    return {"quantization": cfg.record(), "fallback_layers": res.meta.get("fallback_layers", []),
            "quantize_seconds": res.meta["seconds"]}


def apply_run(runner, spec, weights_dir: Path):
    """The base model with this run's mask (and updated or quantized weights, if any) applied from
    ``weights_dir`` (its ``mask/`` or ``quant/`` folder); returns the MaskSet (``None`` for the unquantized
    dense baseline)."""
    from ..io.masks import FILENAME

    loaded = runner.model()
    if spec.method.kind == "dense" and not (weights_dir / FILENAME).is_file():
        return loaded, None
    ms, _ = apply_mask_dir(loaded, weights_dir)
    return loaded, ms


def _zeroshot(runner, loaded) -> dict:
    """Zero-shot scores, or ``{"skipped": reason}`` when the stage cannot run here (an optional source)."""
    ev = runner.recipe.evaluation
    if not ev.zeroshot.enabled:
        return {"skipped": "disabled in the recipe (evaluation.zeroshot.enabled: false)"}
    try:
        from ..evaluation.zeroshot import run_zeroshot

        zs = run_zeroshot(loaded, ev.zeroshot.tasks, limit=ev.zeroshot.limit, batch_size=ev.zeroshot.batch_size,
                          device=runner.recipe.device, progress=runner.progress)
    except ImportError as exc:
        return {"skipped": f"zero-shot evaluation is not installed ({exc})"}
    except TilesparseError as exc:
        return {"skipped": str(exc)}
    out = zs.to_dict()
    if not zs.scores:
        out["skipped"] = "no task could be run: " + "; ".join(f"{k}: {v}" for k, v in zs.unavailable.items())
    return out


def evaluate_run(runner, spec, weights_dir: Path) -> dict:
    """Perplexity on every recipe text and zero-shot scores of one run (its model from ``weights_dir``)."""
    from ..data import OPTIONAL_TEXTS
    from ..evaluation import evaluate_text

    ev = runner.recipe.evaluation
    loaded, _ = apply_run(runner, spec, weights_dir)
    out = {"perplexity": {}, "perplexity_details": {}, "zeroshot": {}}
    for text in ev.perplexity.texts:
        try:
            res = evaluate_text(loaded, text, seqlen=ev.perplexity.seqlen, max_windows=ev.perplexity.windows,
                                batch_size=ev.perplexity.batch_size, progress=runner.progress)
        except TilesparseError as exc:
            if text not in OPTIONAL_TEXTS:
                raise
            out["perplexity_skipped"] = {**out.get("perplexity_skipped", {}), text: str(exc)}
            runner.log(f"    {text}: not evaluated ({exc})")
            continue
        out["perplexity"][res.text] = res.perplexity
        out["perplexity_details"][res.text] = res.to_dict()
        runner.log(f"    {res}")
    out["zeroshot"] = _zeroshot(runner, loaded)
    if "skipped" in out["zeroshot"]:
        runner.log(f"    zero-shot skipped: {out['zeroshot']['skipped']}")
    runner.restore()
    return out


def export_run(runner, spec, weights_dir: Path, export_dir: Path) -> dict:
    """Pack the masked model of one run into the hybrid format and save a folder that ships:
    ``model.packed.safetensors`` + config + tokenizer, loadable with ``load_model(export_dir)``. 4-bit
    quantized weights ship as packed 4-bit codes, other bit widths as their dequantized values in bf16."""
    loaded, ms = apply_run(runner, spec, weights_dir)
    metadata = {"run": spec.run_id}
    quant = None
    if ms.meta.get("quantization"):
        from ..io.quantized import QUANT_FILE, load_quantized
        from ..quant.state import describe

        if ms.meta["quantization"].get("bits") == 4 and (weights_dir / QUANT_FILE).is_file():
            quant = load_quantized(weights_dir)
        how = "packed 4-bit codes" if quant is not None else "dequantized values in bf16"
        metadata["quantization"] = f"{describe(ms.meta['quantization'])} ({how})"
    try:
        return export_packed(loaded, ms, export_dir, tile=runner.recipe.tile_shape, metadata=metadata,
                             quantization=quant)
    finally:
        runner._loaded = None  # the modules were replaced: reload the pristine model for later stages
