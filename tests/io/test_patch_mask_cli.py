"""``tilesparse import-mask`` / ``export-mask`` on a tiny LLaMA folder and hand-built PATCH files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from patch_npz_util import load_their_npz, random_24, random_hybrid, save_their_npz, tiny_llama_weights
from tilesparse.cli import main
from tilesparse.io import load_mask_artifact, read_mask_header
from tilesparse.models import load_model, weights_fingerprint


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def their_file(path, seed=0, *, hybrid=True):
    rng = np.random.default_rng(seed)
    keeps = {k: (random_hybrid(rng, *s, (32, 32))[0] if hybrid else random_24(rng, *s))
             for k, s in tiny_llama_weights().items()}
    save_their_npz(path, keeps, {"base_model": "tiny-llama", "method": "PATCH", "sparsity": "45%"})
    return keeps


def test_import_then_export_round_trip(capsys, tmp_path, tiny_model_dir):
    src = tmp_path / "mask.npz"
    keeps = their_file(src)
    code, out, err = run_cli(capsys, "import-mask", src, "--out", tmp_path / "imported", "--model", tiny_model_dir,
                             "--tile", "32")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    assert out.startswith("imported 14 layers") and "tile 32x32" in out and "dense tiles" in out

    model = load_model(tiny_model_dir).model
    ms = load_mask_artifact(tmp_path / "imported", model)  # shapes and fingerprint checked
    assert ms.meta["fingerprint"] == weights_fingerprint(model)
    assert f"measured sparsity {ms.sparsity():.4f}" in out
    for key, keep in keeps.items():
        assert torch.equal(ms.layers[key[:-7]].to_bool(), torch.from_numpy(keep))

    code, out, err = run_cli(capsys, "export-mask", "--mask", tmp_path / "imported", "--format", "patch",
                             "--out", tmp_path / "exported.npz")
    assert code == 0, err
    assert "exported 14 layers" in out
    masks, meta = load_their_npz(tmp_path / "exported.npz")
    assert masks.keys() == keeps.keys() and all(np.array_equal(masks[k], keeps[k]) for k in keeps)
    assert meta["tile"] == [32, 32] and meta["base_model"] == ms.meta["model"]


def test_import_json_summary_24(capsys, tmp_path, tiny_model_dir):
    src = tmp_path / "mask.npz"
    their_file(src, hybrid=False)
    code, out, err = run_cli(capsys, "import-mask", src, "--out", tmp_path / "m", "--model", tiny_model_dir, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["layers"] == 14 and s["patterns"] == ["2:4"] and s["tile"] == ["128x128"]
    assert s["measured_sparsity"] == pytest.approx(0.5) and s["dense_tile_fraction"] == 0.0
    assert read_mask_header(tmp_path / "m")["meta"]["target_sparsity"] == pytest.approx(0.45)


def test_import_without_model(capsys, tmp_path):
    src = tmp_path / "mask.npz"
    their_file(src)
    code, out, err = run_cli(capsys, "import-mask", src, "--out", tmp_path / "m", "--no-model", "--tile", "32")
    assert code == 0, err
    assert "fingerprint" not in read_mask_header(tmp_path / "m")["meta"]


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_import_invalid_group_is_one_line(capsys, tmp_path, tiny_model_dir):
    src = tmp_path / "mask.npz"
    keeps = their_file(src, hybrid=False)
    keeps["model.layers.0.self_attn.q_proj.weight"][3, 4:8] = [True, False, False, False]
    save_their_npz(src, keeps)
    code, _, err = run_cli(capsys, "import-mask", src, "--out", tmp_path / "m", "--model", tiny_model_dir)
    assert code == 2
    line = one_error_line(err)
    assert "model.layers.0.self_attn.q_proj: tile (0, 0)" in line and "keeps 1 of 4" in line
    assert not (tmp_path / "m").exists()


def test_import_shape_mismatch_is_one_line(capsys, tmp_path, tiny_model_dir):
    src = tmp_path / "mask.npz"
    keeps = their_file(src, hybrid=False)
    keeps["model.layers.1.mlp.down_proj.weight"] = random_24(np.random.default_rng(1), 128, 64)
    save_their_npz(src, keeps)
    code, _, err = run_cli(capsys, "import-mask", src, "--out", tmp_path / "m", "--model", tiny_model_dir)
    assert code == 2 and "is for a different model" in one_error_line(err)


@pytest.mark.parametrize("argv,msg", [
    (["import-mask", "{tmp}/nope.npz", "--out", "{tmp}/m", "--no-model"], "does not exist"),
    (["import-mask", "{tmp}/mask.npz", "--out", "{tmp}/m", "--no-model", "--tile", "32x30"], "multiple of 4"),
    (["export-mask", "--mask", "{tmp}/none", "--out", "{tmp}/x.npz"], "does not exist"),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, msg):
    their_file(tmp_path / "mask.npz")
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and msg in one_error_line(err)


@pytest.mark.parametrize("cmd", ["import-mask", "export-mask"])
def test_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out
