"""What a new user does first, from an empty cache: ``tilesparse fetch``, then a small recipe end to end.

Runs the installed command line in subprocesses (as a user would), with the Hugging Face hub forced
offline, so the network-only zero-shot source is skipped with its reason and the job still exits 0.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

RECIPE = {
    "model": "default",
    "tile": 128,
    "data": {"calibration": "austen-train", "calib_samples": 2, "calib_seqlen": 64, "train": "austen-train"},
    "methods": [
        {"name": "dense", "kind": "dense"},
        {"name": "magnitude-2:4", "kind": "oneshot", "method": "magnitude", "pattern": "2:4"},
        {"name": "patch-joint", "kind": "learn", "mode": "joint", "sparsities": [0.35], "steps": 2, "batch": 2,
         "seqlen": 64, "prior": "magnitude"},
    ],
    "evaluation": {"perplexity": {"texts": ["mobydick"], "seqlen": 128, "windows": 2},
                   "zeroshot": {"tasks": ["persuasion_cloze", "hellaswag"], "limit": 4}},
    "export": {"packed": True},
    "report": {"plots": False},
}


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "tilesparse", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_fetch_into_an_empty_cache_then_a_recipe_end_to_end(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "TILESPARSE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    res = _cli(["fetch"], env, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "default model at" in res.stdout and (cache / "texts" / "mobydick.txt").is_file()

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output": str(tmp_path / "run")}))
    res = _cli(["run", str(recipe)], env, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (tmp_path / "run" / "report.md").read_text()
    runs = {r["run_id"]: r for r in json.loads((tmp_path / "run" / "results.json").read_text())}
    assert set(runs) == {"dense", "magnitude-24-s50", "patch-joint-s35", "patch-joint-s35-prior"}
    for r in runs.values():
        assert set(r["stages"]) == {"mask", "evaluation", "zeroshot", "export"}
        assert r["stages"]["mask"] == "computed" and r["stages"]["evaluation"] == "computed"
        assert r["perplexity"]["Moby Dick"] > 1
        # the offline task ran; the hub-only one is listed as not evaluated, with why
        assert r["zeroshot"]["tasks"]["persuasion_cloze"]["n"] == 4
        assert "hellaswag" in r["zeroshot"]["unavailable"]
    assert runs["patch-joint-s35"]["stages"]["export"] == "computed"
    assert runs["magnitude-24-s50"]["stages"]["export"] == "computed"
    assert runs["dense"]["stages"]["export"].startswith("skipped: ")
    assert runs["patch-joint-s35-prior"]["stages"]["export"].startswith("skipped: ")
    assert runs["patch-joint-s35"]["export"]["reload_max_logit_diff"] >= 0
    assert "## Stages" in report and "## Packed exports" in report and "Not evaluated: hellaswag" in report
    # a finished run leaves no resumable checkpoint behind
    assert not list((tmp_path / "run").rglob("checkpoint.pt"))
