"""The stage functions of a recipe run: build a mask, evaluate it, export the packed model.

Each takes the :class:`~tilesparse.recipe.runner.RecipeRunner` (for the model and the recipe) and
returns a JSON-serialisable dict of details; the runner handles fingerprints and skipping.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import TilesparseError

UPDATED_WEIGHTS = "updated_weights.safetensors"


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
    if m.kind == "oneshot":
        return _oneshot(runner, loaded, spec, mask_dir)
    return _learned(runner, loaded, spec, mask_dir)


def _oneshot(runner, loaded, spec, mask_dir: Path) -> dict:
    from ..io import save_mask_artifact
    from ..models import find_prunable_linears
    from ..pruning import PruneConfig, prune_text

    m, d = spec.method, runner.recipe.data
    cfg = PruneConfig(method=m.method, pattern=m.pattern, sparsity=spec.target, tile=runner.recipe.tile_shape,
                      update_weights=m.update_weights)
    ms = prune_text(loaded, cfg, d.calibration, d.calib_samples, d.calib_seqlen, d.seed, progress=runner.progress)
    save_mask_artifact(ms, mask_dir)
    if m.update_weights:
        from safetensors.torch import save_file

        weights = {l.name: l.module.weight.detach().contiguous().cpu() for l in find_prunable_linears(loaded.model)}
        save_file(weights, str(mask_dir / UPDATED_WEIGHTS))
        runner.restore()
    return {"measured_sparsity": ms.sparsity(), "per_layer": ms.per_layer()}


def _learned(runner, loaded, spec, mask_dir: Path) -> dict:
    from ..data import load_text, tokenize
    from ..io import save_mask_artifact
    from ..learning.config import make_config
    from ..learning.final import density_report
    from ..learning.trainer import learn_masks
    from ..models import find_prunable_linears

    m, d = spec.method, runner.recipe.data
    overrides = dict(mode=m.mode, sparsity=spec.target if m.mode != "maskllm" else 0.5, steps=m.steps,
                     batch=m.batch, seqlen=m.seqlen, lr=m.lr, prior=m.prior, tile=runner.recipe.tile_shape,
                     seed=d.seed, text=d.train, calib_samples=d.calib_samples, calib_seqlen=d.calib_seqlen,
                     dtype=runner.recipe.dtype)
    unknown = set(m.options) - set(make_config().to_dict())
    if unknown:
        raise TilesparseError(f"recipe: {m.name}.options has unknown learning settings: {sorted(unknown)}")
    overrides.update(m.options)
    cfg = make_config(**overrides)
    train_ids = tokenize(loaded.tokenizer, load_text(d.train).text)
    calib = None
    if cfg.prior in ("wanda", "sparsegpt"):
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
    resume = (work / "checkpoint.pt").is_file()
    res = learn_masks(loaded.model, cfg, train_ids, out_dir=work, resume=resume, model_name=loaded.name,
                      calib_ids=calib, progress=runner.progress)
    ms = res.maskset
    save_mask_artifact(ms, mask_dir)
    block_of = {l.name: l.block_index for l in find_prunable_linears(loaded.model)}
    return {"measured_sparsity": ms.sparsity(), "per_layer": ms.per_layer(),
            "density": density_report(ms, block_of), "steps": cfg.steps, "tokens": res.tokens,
            "learn_seconds": res.seconds, "config": cfg.to_dict()}


def apply_run(runner, spec, mask_dir: Path):
    """The base model with this run's mask (and updated weights, if any) applied; returns the MaskSet."""
    loaded = runner.model()
    if spec.method.kind == "dense":
        return loaded, None
    from ..io import apply_masks, load_mask_artifact

    upd = mask_dir / UPDATED_WEIGHTS
    if upd.is_file():
        from safetensors.torch import load_file

        with torch.no_grad():
            for name, w in load_file(str(upd)).items():
                loaded.model.get_submodule(name).weight.copy_(w)
    ms = load_mask_artifact(mask_dir, loaded.model, check_fingerprint=not upd.is_file())
    apply_masks(loaded.model, ms)
    return loaded, ms


def evaluate_run(runner, spec, mask_dir: Path) -> dict:
    """Perplexity on every recipe text and zero-shot scores of one run."""
    from ..evaluation import evaluate_text

    ev = runner.recipe.evaluation
    loaded, _ = apply_run(runner, spec, mask_dir)
    out = {"perplexity": {}, "perplexity_details": {}, "zeroshot": {}}
    for text in ev.perplexity.texts:
        res = evaluate_text(loaded, text, seqlen=ev.perplexity.seqlen, max_windows=ev.perplexity.windows,
                            batch_size=ev.perplexity.batch_size, progress=runner.progress)
        out["perplexity"][res.text] = res.perplexity
        out["perplexity_details"][res.text] = res.to_dict()
        runner.log(f"    {res}")
    if ev.zeroshot.enabled:
        try:
            from ..evaluation.zeroshot import run_zeroshot
        except ImportError as exc:
            out["zeroshot"] = {"unavailable": f"zero-shot evaluation not installed ({exc})"}
        else:
            zs = run_zeroshot(loaded, ev.zeroshot.tasks, limit=ev.zeroshot.limit,
                              batch_size=ev.zeroshot.batch_size, device=runner.recipe.device)
            out["zeroshot"] = zs.to_dict()
    runner.restore()
    return out


def export_run(runner, spec, mask_dir: Path, export_dir: Path) -> dict:
    """Pack the masked model of one run into the hybrid format (bf16) and save a folder that ships:
    ``model.packed.safetensors`` + config + tokenizer, loadable with ``load_model(export_dir)``."""
    from ..io.packed import save_packed_model
    from ..kernels.linear import convert_model
    from ..models.loading import PACKED_FILE

    from ..io.packed import non_persistent_buffers

    loaded, ms = apply_run(runner, spec, mask_dir)
    # rotary frequencies etc. ship as the loaded model holds them (fp32), not cast with the weights
    buffers = {k: t.detach().clone() for k, t in non_persistent_buffers(loaded.model).items()}
    model = loaded.model.to(torch.bfloat16)
    for key, t in buffers.items():  # as HF keeps them in a bf16 model, and as the file ships them
        parent, _, name = key.rpartition(".")
        (model.get_submodule(parent) if parent else model)._buffers[name] = t
    dense_bytes = sum(p.numel() * 2 for p in model.parameters())
    masked_linear_bytes = sum(model.get_submodule(n).weight.numel() * 2 for n in ms.layers)
    convert_model(model, ms.to_bool(), tile=runner.recipe.tile_shape)
    export_dir.mkdir(parents=True, exist_ok=True)
    size = save_packed_model(model, export_dir / PACKED_FILE,
                             extra_metadata={"run": spec.run_id, "model": loaded.name,
                                             "sparsity": f"{ms.sparsity():.6f}"}, buffers=buffers)
    model.config.save_pretrained(export_dir)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(export_dir)
    diff = check_export(model, export_dir)
    runner._loaded = None  # the modules were replaced: reload the pristine model for later stages
    return {"file_bytes": int(size), "dense_bf16_bytes": int(dense_bytes),
            "linear_dense_bf16_bytes": int(masked_linear_bytes), "file_vs_dense": size / dense_bytes,
            "reload_max_logit_diff": diff}


def check_export(model, export_dir: Path, tokens: int = 32) -> float:
    """Load the exported folder back (as a user would) and compare its logits with ``model``'s on a few
    random tokens; raise :class:`TilesparseError` if they differ beyond bf16 rounding (a broken export
    must not ship silently). Returns the largest absolute logit difference."""
    from ..models import load_model

    back = load_model(str(export_dir), dtype=torch.bfloat16, device=str(next(model.parameters()).device))
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(
        next(model.parameters()).device)
    with torch.no_grad():
        ref = model(ids).logits.float()
        got = back.model(ids).logits.float()
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max())
    if not diff <= 0.02 * max(scale, 1.0):
        raise TilesparseError(f"export check failed: the reloaded model {export_dir} differs from the one exported "
                              f"(max |logit diff| {diff:.3g} at logit scale {scale:.3g})")
    return diff
