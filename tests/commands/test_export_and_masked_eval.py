"""``tilesparse export``, and ``eval`` / ``generate`` on masks with updated weights and on packed exports."""

import json

import pytest
import torch

from tilesparse.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def mask_with_updated_weights(tiny_model_dir, tmp_path):
    """A magnitude 2:4 mask of the tiny model, with 'reconstructed' weights beside it (as SparseGPT's
    update leaves them): the pruned linears scaled by 1.5, so that applying them or not is visible."""
    from tilesparse.io import save_mask_artifact
    from tilesparse.io.export import save_updated_weights
    from tilesparse.models import find_prunable_linears, load_model
    from tilesparse.pruning import PruneConfig, prune_model

    loaded = load_model(str(tiny_model_dir))
    ms = prune_model(loaded.model, None, PruneConfig(method="magnitude", pattern="2:4", tile=32), progress=False)
    mask_dir = tmp_path / "mask"
    save_mask_artifact(ms, mask_dir)
    with torch.no_grad():
        for lin in find_prunable_linears(loaded.model):
            lin.module.weight.mul_(1.5)
    save_updated_weights(loaded.model, mask_dir)
    return mask_dir


def _ppl(capsys, tiny_model_dir, text_file, *extra):
    code, out, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--text", text_file, "--seqlen", 64,
                             "--windows", 2, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_eval_applies_the_updated_weights_beside_a_mask(capsys, tiny_model_dir, text_file, mask_with_updated_weights,
                                                        tmp_path):
    with_upd = _ppl(capsys, tiny_model_dir, text_file, "--mask", mask_with_updated_weights)
    assert with_upd["model_state"] == "masked, 50.0 % sparse, with the updated weights stored beside the mask"
    mask_only = _ppl(capsys, tiny_model_dir, text_file, "--mask", mask_with_updated_weights, "--no-updated-weights")
    assert mask_only["model_state"] == "masked, 50.0 % sparse, mask only"
    assert with_upd["perplexity"] != mask_only["perplexity"]
    # the same numbers as applying them by hand
    from tilesparse.evaluation import evaluate_text
    from tilesparse.io.export import apply_mask_dir
    from tilesparse.models import load_model

    loaded = load_model(str(tiny_model_dir))
    apply_mask_dir(loaded, mask_with_updated_weights)
    ref = evaluate_text(loaded, str(text_file), seqlen=64, max_windows=2, progress=False)
    assert with_upd["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    code, out, _ = run_cli(capsys, "eval", "--model", tiny_model_dir, "--text", text_file, "--seqlen", 64,
                           "--windows", 2, "--mask", mask_with_updated_weights)
    assert code == 0 and "[masked, 50.0 % sparse, with the updated weights stored beside the mask]" in out


def test_export_command_ships_a_checked_packed_folder(capsys, tiny_model_dir, text_file, mask_with_updated_weights,
                                                      tmp_path):
    out_dir = tmp_path / "packed"
    code, out, err = run_cli(capsys, "export", "--model", tiny_model_dir, "--mask", mask_with_updated_weights,
                             "--out", out_dir)
    assert code == 0, err
    assert "with the updated weights stored beside the mask" in out
    assert "model.packed.safetensors:" in out and "MiB" in out and "reloaded and compared" in out
    assert (out_dir / "model.packed.safetensors").is_file() and (out_dir / "config.json").is_file()
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    # the export evaluates like the masked model it was made from (bf16 rounding apart)
    masked = _ppl(capsys, tiny_model_dir, text_file, "--mask", mask_with_updated_weights)
    shipped = _ppl(capsys, out_dir, text_file)
    assert shipped["model_state"] == "14 packed hybrid layers"
    assert shipped["perplexity"] == pytest.approx(masked["perplexity"], rel=0.02)
    # generate says what it runs
    code, out, err = run_cli(capsys, "generate", "--model", out_dir, "--prompt", "ab", "--max-new-tokens", 3,
                             "--no-chat")
    assert code == 0, err
    assert "(packed hybrid): 14 packed hybrid layers, 3 tokens" in out and "dense" not in out
    # a second export into the same folder needs --force
    code, _, err = run_cli(capsys, "export", "--model", tiny_model_dir, "--mask", mask_with_updated_weights,
                           "--out", out_dir)
    assert code == 2 and "already holds a packed model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,msg", [
    (["--mask", "/no/such/mask"], "does not exist"),
])
def test_export_bad_input_is_one_line(capsys, tiny_model_dir, tmp_path, argv, msg):
    code, _, err = run_cli(capsys, "export", "--model", tiny_model_dir, "--out", tmp_path / "o", *argv)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_mask_on_a_packed_export_is_refused(capsys, tiny_model_dir, text_file, mask_with_updated_weights, tmp_path):
    out_dir = tmp_path / "packed"
    assert run_cli(capsys, "export", "--model", tiny_model_dir, "--mask", mask_with_updated_weights,
                   "--out", out_dir)[0] == 0
    code, _, err = run_cli(capsys, "eval", "--model", out_dir, "--text", text_file, "--mask",
                           mask_with_updated_weights)
    assert code == 2 and "already carries its mask" in err
