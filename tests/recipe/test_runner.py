import json
from pathlib import Path

import pytest
import torch

from tilesparse.recipe import RecipeRunner, parse_recipe
from tilesparse.io.export import check_export
from tilesparse.recipe import stages


def tiny_recipe(model_dir, text_file, out, **over):
    d = {
        "model": str(model_dir), "tile": 32, "output": str(out),
        "data": {"calibration": str(text_file), "calib_samples": 4, "calib_seqlen": 64, "train": str(text_file)},
        "methods": [
            {"name": "dense", "kind": "dense"},
            {"name": "magnitude-2:4", "kind": "oneshot", "method": "magnitude", "pattern": "2:4"},
            {"name": "wanda-hybrid", "kind": "oneshot", "method": "wanda", "pattern": "hybrid",
             "sparsities": [0.25, 0.4]},
        ],
        "evaluation": {"perplexity": {"texts": [str(text_file)], "seqlen": 64, "windows": 3},
                       "zeroshot": {"enabled": False}},
        "export": {"packed": False},
    }
    d.update(over)
    return parse_recipe(d)


def test_recipe_runs_then_resumes(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    logs = []
    results = RecipeRunner(tiny_recipe(tiny_model_dir, text_file, out), progress=False, log=logs.append).run()
    assert [r.run_id for r in results] == ["dense", "magnitude-24-s50", "wanda-hybrid-s25", "wanda-hybrid-s40"]
    sp = {r.run_id: r.measured_sparsity for r in results}
    assert sp["dense"] == 0 and sp["magnitude-24-s50"] == pytest.approx(0.5)
    assert abs(sp["wanda-hybrid-s25"] - 0.25) < 0.1 and abs(sp["wanda-hybrid-s40"] - 0.4) < 0.1
    ppl = {r.run_id: r.perplexity["text.txt"] for r in results}
    assert all(v > 1 for v in ppl.values())
    assert ppl["dense"] != ppl["magnitude-24-s50"]  # the mask was really applied
    report = (out / "report.md").read_text()
    assert "wanda-hybrid-s40" in report and (out / "tradeoff-text-txt.png").is_file()
    assert not any("reused" in l for l in logs)
    assert "(all 8 stages computed)" in report

    # second run: every stage is reused, same numbers
    logs2 = []
    again = RecipeRunner(tiny_recipe(tiny_model_dir, text_file, out), progress=False, log=logs2.append).run()
    assert sum("reused" in l for l in logs2) == 2 * 4
    assert [r.perplexity for r in again] == [r.perplexity for r in results]
    assert "(8 of 8 stages reused from an earlier run)" in (out / "report.md").read_text()

    # changing only the evaluation re-evaluates but keeps the masks
    r3 = tiny_recipe(tiny_model_dir, text_file, out,
                     evaluation={"perplexity": {"texts": [str(text_file)], "seqlen": 64, "windows": 2},
                                 "zeroshot": {"enabled": False}})
    logs3 = []
    RecipeRunner(r3, progress=False, log=logs3.append).run()
    assert sum("mask stage done, reused" in l for l in logs3) == 4
    assert sum("evaluating" in l for l in logs3) == 4


def interrupt_third_mask(monkeypatch, recipe):
    """Run ``recipe`` with Ctrl-C pressed while the third mask is being built; restore make_mask after."""
    real = stages.make_mask
    calls = []

    def crash_on_third(runner, spec, mask_dir):
        calls.append(spec.run_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(runner, spec, mask_dir)

    monkeypatch.setattr(stages, "make_mask", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        RecipeRunner(recipe, progress=False, log=lambda s: None).run()
    monkeypatch.setattr(stages, "make_mask", real)


def test_interrupted_recipe_resumes_from_finished_stages(tiny_model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_third_mask(monkeypatch, tiny_recipe(tiny_model_dir, text_file, out))
    logs = []
    RecipeRunner(tiny_recipe(tiny_model_dir, text_file, out), progress=False, log=logs.append).run()
    assert sum("mask stage done, reused" in l for l in logs) == 2
    assert sum("building mask" in l for l in logs) == 2
    data = json.loads((out / "results.json").read_text())
    assert len(data) == 4


def test_export_ships_a_loadable_packed_model(tiny_model_dir, text_file, tmp_path):
    from tilesparse.evaluation import evaluate_text
    from tilesparse.kernels.linear import HybridLinear
    from tilesparse.models import load_model

    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out, export={"packed": True},
                    methods=[{"name": "wanda-hybrid", "kind": "oneshot", "method": "wanda", "pattern": "hybrid",
                              "sparsities": [0.3]}])
    (res,) = RecipeRunner(r, progress=False, log=lambda s: None).run()
    info = json.loads((out / "stages" / res.run_id / "export" / "stage.json").read_text())
    assert info["file_bytes"] < info["dense_bf16_bytes"]
    lm = load_model(res.export_dir, dtype="bfloat16")
    hyb = [m for m in lm.model.modules() if isinstance(m, HybridLinear)]
    assert len(hyb) == 14  # every decoder linear of the tiny 2-layer LLaMA
    shipped = evaluate_text(lm, str(text_file), seqlen=64, max_windows=3, progress=False).perplexity
    # bf16 packed model vs fp32 masked model: same function up to bf16 rounding
    assert shipped == pytest.approx(res.perplexity["text.txt"], rel=0.02)
    assert info["reload_max_logit_diff"] < 1e-2  # the export was loaded back and checked
    # the shipped config says what the file holds
    config = json.loads((Path(res.export_dir) / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert config.get("_model_name_or_path", tiny_model_dir.name) == tiny_model_dir.name
    # the report and results.json list the export's size, its reload check and every stage's status
    report = (out / "report.md").read_text()
    assert "## Packed exports" in report and f"{info['file_vs_dense']:.3f}x" in report and "passed (" in report
    (row,) = json.loads((out / "results.json").read_text())
    assert row["stages"] == {"mask": "computed", "evaluation": "computed", "export": "computed",
                             "zeroshot": "skipped: disabled in the recipe (evaluation.zeroshot.enabled: false)"}
    assert row["export"]["file_bytes"] == info["file_bytes"]
    assert "| wanda-hybrid-s30 | computed | computed | computed | skipped: disabled" in report
    # the default dtype (float32, what the CLI uses) loads the bf16 export too: packed values follow the model
    lm32 = load_model(res.export_dir)
    hyb32 = [m for m in lm32.model.modules() if isinstance(m, HybridLinear)]
    assert {m.packed.dtype for m in hyb32} == {torch.float32}
    assert evaluate_text(lm32, str(text_file), seqlen=64, max_windows=3, progress=False).perplexity == \
        pytest.approx(shipped, rel=0.02)


def test_learned_method_stage(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out,
                    methods=[{"name": "patch-joint", "kind": "learn", "mode": "joint", "sparsities": [0.35],
                              "steps": 3, "batch": 2, "seqlen": 32, "prior": "magnitude",
                              "options": {"checkpoint_every": 2}}])
    res, prior = RecipeRunner(r, progress=False, log=lambda s: None).run()
    assert abs(res.measured_sparsity - 0.35) < 0.1
    assert res.details["steps"] == 3 and res.details["tokens"] == 3 * 2 * 32
    assert (out / "block-density.png").is_file() and (out / "tile-maps.png").is_file()
    report = (out / "report.md").read_text()
    assert "Density per decoder block" in report and "3 steps" in report
    # the one-shot prior the run started from is its own row: same target, evaluated on the same texts
    assert prior.run_id == "patch-joint-s35-prior" and prior.kind == "prior"
    assert prior.method == "patch-joint prior (magnitude)" and "| patch-joint-s35-prior | prior |" in report
    assert abs(prior.measured_sparsity - 0.35) < 0.1 and set(prior.perplexity) == set(res.perplexity)
    assert prior.perplexity != res.perplexity
    # the finished run's checkpoint is gone (recipe key keep_checkpoints keeps it)
    assert not (out / "stages" / res.run_id / "learn" / "checkpoint.pt").exists()
    logs = []
    RecipeRunner(r, progress=False, log=logs.append).run()
    assert sum("mask stage done, reused" in l for l in logs) == 2


def test_prior_row_matches_the_one_shot_prior_and_checkpoints_can_be_kept(tiny_model_dir, text_file, tmp_path):
    from tilesparse.io import load_mask_artifact
    from tilesparse.learning.priors import magnitude_24
    from tilesparse.masks.tiles import DENSE
    from tilesparse.models import find_prunable_linears, load_model

    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out, keep_checkpoints=True,
                    methods=[{"name": "patch-tile", "kind": "learn", "mode": "tile", "sparsities": [0.25],
                              "steps": 2, "batch": 2, "seqlen": 32, "prior": "magnitude"}])
    res, prior = RecipeRunner(r, progress=False, log=lambda s: None).run()
    assert (out / "stages" / res.run_id / "learn" / "checkpoint.pt").is_file()
    ms = load_mask_artifact(prior.mask_dir)
    model = load_model(str(tiny_model_dir)).model
    for lin in find_prunable_linears(model):
        lm = ms.layers[lin.name]
        keep = lm.to_bool()
        sparse_tiles = (lm.kinds != DENSE).repeat_interleave(32, 0).repeat_interleave(32, 1)
        sparse_tiles = sparse_tiles[:lin.out_features, :lin.in_features]
        # inside 2:4 tiles: the magnitude 2:4 mask; dense tiles: everything
        assert torch.equal(keep[sparse_tiles], magnitude_24(lin.weight)[sparse_tiles])
        assert bool(keep[~sparse_tiles].all())
    # rebuilt without the learned stage's copy: the same mask
    (out / "stages" / res.run_id / "mask" / "prior" / "masks.safetensors").unlink()
    (out / "stages" / prior.run_id / "mask" / "stage.json").unlink()
    _, again = RecipeRunner(r, progress=False, log=lambda s: None).run()
    rebuilt = load_mask_artifact(again.mask_dir)
    assert all(torch.equal(rebuilt.layers[n].to_bool(), ms.layers[n].to_bool()) for n in ms.layers)


def test_report_only_and_partial_report(tiny_model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_third_mask(monkeypatch, tiny_recipe(tiny_model_dir, text_file, out))
    partial = (out / "report.md").read_text()  # written after each finished run
    assert "Partial report: 2 of 4 runs finished" in partial and "magnitude-24-s50" in partial
    (out / "report.md").unlink()
    runner = RecipeRunner(tiny_recipe(tiny_model_dir, text_file, out), progress=False, log=lambda s: None)
    assert [r.run_id for r in runner.finished()] == ["dense", "magnitude-24-s50"]
    text = runner.report_only().read_text()
    assert "Partial report: 2 of 4 runs finished" in text and "rewritten from finished stages" in text


def test_stale_learning_checkpoint_is_not_resumed(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out,
                    methods=[{"name": "patch-joint", "kind": "learn", "mode": "joint", "sparsities": [0.35],
                              "steps": 2, "batch": 2, "seqlen": 32, "prior": "magnitude"}])
    learn = out / "stages" / "patch-joint-s35" / "learn"
    learn.mkdir(parents=True)
    (learn / "stage-fingerprint").write_text("from-an-older-recipe")
    (learn / "checkpoint.pt").write_bytes(b"not a checkpoint of this recipe")
    res, _ = RecipeRunner(r, progress=False, log=lambda s: None).run()
    assert res.details["steps"] == 2 and abs(res.measured_sparsity - 0.35) < 0.1
    assert (learn / "stage-fingerprint").read_text() != "from-an-older-recipe"


def test_export_check_refuses_a_model_that_does_not_match_its_file(tiny_model_dir, text_file, tmp_path):
    from tilesparse.errors import TilesparseError
    from tilesparse.models import load_model

    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out, export={"packed": True},
                    methods=[{"name": "mag", "kind": "oneshot", "method": "magnitude", "pattern": "2:4"}])
    (res,) = RecipeRunner(r, progress=False, log=lambda s: None).run()
    other = load_model(res.export_dir, dtype="bfloat16").model
    check_export(other, Path(res.export_dir))  # itself: passes
    with torch.no_grad():
        other.model.norm.weight.mul_(3.0)  # what a lost buffer or a wrong tensor would do
    with pytest.raises(TilesparseError, match="export check failed"):
        check_export(other, Path(res.export_dir))


def test_refit_row_keeps_the_learned_masks_and_ships_the_refitted_weights(tiny_model_dir, text_file, tmp_path):
    from tilesparse.io import load_mask_artifact
    from tilesparse.io.export import UPDATED_WEIGHTS

    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out, export={"packed": True},
                    report={"prior_rows": False},
                    methods=[{"name": "patch-joint", "kind": "learn", "mode": "joint", "sparsities": [0.35],
                              "steps": 2, "batch": 2, "seqlen": 32, "prior": "magnitude", "refit": True,
                              "options": {"loss": "kd"}}])
    learned, refit = RecipeRunner(r, progress=False, log=lambda s: None).run()
    assert refit.run_id == "patch-joint-s35-refit" and refit.kind == "refit"
    assert refit.method == "patch-joint + refit"
    assert "| patch-joint-s35-refit | refit |" in (out / "report.md").read_text()
    a, b = load_mask_artifact(learned.mask_dir), load_mask_artifact(refit.mask_dir)
    assert all(torch.equal(a.layers[n].to_bool(), b.layers[n].to_bool()) for n in a.layers)
    assert (Path(refit.mask_dir) / UPDATED_WEIGHTS).is_file()
    assert not (Path(learned.mask_dir) / UPDATED_WEIGHTS).exists()
    assert refit.perplexity != learned.perplexity
    # the export stage loads the packed folder back and compares it with the refitted model
    assert refit.export_dir and (Path(refit.export_dir) / "model.packed.safetensors").is_file()


def test_refit_row_keeping_the_tile_map(tiny_model_dir, text_file, tmp_path):
    from tilesparse.io import load_mask_artifact

    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out, report={"prior_rows": False},
                    methods=[{"name": "patch-joint", "kind": "learn", "mode": "joint", "sparsities": [0.35],
                              "steps": 2, "batch": 2, "seqlen": 32, "prior": "magnitude", "refit": "tiles"}])
    learned, refit = RecipeRunner(r, progress=False, log=lambda s: None).run()
    assert refit.method == "patch-joint + refit (tile map kept)"
    a, b = load_mask_artifact(learned.mask_dir), load_mask_artifact(refit.mask_dir)
    assert all(torch.equal(a.layers[n].tile_kinds(), b.layers[n].tile_kinds()) for n in a.layers)
    assert b.meta["refit"].startswith("tiles")


def test_refit_only_for_learned_methods(tiny_model_dir, text_file, tmp_path):
    from tilesparse.errors import TilesparseError

    with pytest.raises(TilesparseError, match="'refit' applies to learned methods only"):
        tiny_recipe(tiny_model_dir, text_file, tmp_path, methods=[
            {"name": "m", "kind": "oneshot", "method": "magnitude", "pattern": "2:4", "refit": True}])


def test_an_optional_text_that_cannot_be_had_is_skipped_with_the_reason(tiny_model_dir, text_file, tmp_path,
                                                                         monkeypatch):
    import tilesparse.evaluation as evaluation
    from tilesparse.errors import TilesparseError

    real = evaluation.evaluate_text

    def fake(loaded, text, **kw):
        if text == "debian-reference":
            raise TilesparseError("the embedded text 'debian-reference' is not available (no network)")
        return real(loaded, text, **kw)

    monkeypatch.setattr(evaluation, "evaluate_text", fake)
    out = tmp_path / "run"
    r = tiny_recipe(tiny_model_dir, text_file, out, methods=[{"name": "dense", "kind": "dense"}],
                    evaluation={"perplexity": {"texts": ["debian-reference", str(text_file)], "seqlen": 64,
                                               "windows": 2}, "zeroshot": {"enabled": False}})
    (res,) = RecipeRunner(r, progress=False, log=lambda s: None).run()
    assert list(res.perplexity) == [text_file.name] and "debian-reference" in res.perplexity_skipped
    assert "Not evaluated: `debian-reference` (an optional text): the embedded text" in (out / "report.md").read_text()
    with pytest.raises(TilesparseError):  # a required text that fails still stops the run
        r2 = tiny_recipe(tiny_model_dir, text_file, tmp_path / "run2", methods=[{"name": "dense", "kind": "dense"}],
                         evaluation={"perplexity": {"texts": [str(tmp_path / "missing.txt")], "seqlen": 64,
                                                    "windows": 2}, "zeroshot": {"enabled": False}})
        RecipeRunner(r2, progress=False, log=lambda s: None).run()


def test_quantize_section_quantizes_every_run_before_evaluation_and_export(tiny_model_dir, text_file, tmp_path):
    from tilesparse.io.quantized import load_quantized
    from tilesparse.models import load_model

    out = tmp_path / "run"
    methods = [{"name": "dense", "kind": "dense"},
               {"name": "magnitude-2:4", "kind": "oneshot", "method": "magnitude", "pattern": "2:4"}]
    quant = {"method": "gptq", "bits": 4, "group_size": 32}
    r = tiny_recipe(tiny_model_dir, text_file, out, methods=methods, quantize=quant, export={"packed": True})
    results = RecipeRunner(r, progress=False, log=lambda s: None).run()
    assert [x.stages["quantize"] for x in results] == ["computed", "computed"]
    assert "Weights: 4-bit GPTQ, group 32, symmetric" in (out / "report.md").read_text()
    q = load_quantized(out / "stages" / "magnitude-24-s50" / "quant")
    assert q.config.method == "gptq" and q.config.group_size == 32
    assert results[1].details["quantize"]["quantization"]["bits"] == 4
    # the export ships the quantized weights (in bf16)
    packed = load_model(results[1].export_dir)
    assert packed.model.config.tilesparse_quantization["method"] == "gptq"
    assert abs(results[1].export["reload_max_logit_diff"]) < 0.05

    logs = []
    again = RecipeRunner(r, progress=False, log=logs.append).run()
    assert sum("quantize stage done, reused" in l for l in logs) == 2
    assert [x.perplexity for x in again] == [x.perplexity for x in results]
    plain = RecipeRunner(tiny_recipe(tiny_model_dir, text_file, out, methods=methods), progress=False,
                         log=logs.append).run()
    assert "quantize" not in plain[0].stages
    for a, b in zip(plain, results):
        assert a.perplexity != b.perplexity  # the quantized runs were evaluated quantized
