"""``tilesparse quantize`` end to end on a tiny model: after a mask, scored by ``eval --mask``; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tilesparse.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def hybrid_mask(tiny_model_dir, tmp_path):
    from tilesparse.io import save_mask_artifact
    from tilesparse.models import load_model
    from tilesparse.pruning import PruneConfig, prune_model

    loaded = load_model(str(tiny_model_dir))
    ms = prune_model(loaded.model, None, PruneConfig(method="magnitude", pattern="hybrid", sparsity=0.3, tile=32),
                     progress=False)
    save_mask_artifact(ms, tmp_path / "mask")
    return tmp_path / "mask"


def _eval(capsys, model, text, *extra):
    code, out, err = run_cli(capsys, "eval", "--model", model, "--text", text, "--seqlen", 64, "--windows", 2,
                             "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_gptq_after_a_mask_is_what_eval_scores(capsys, tiny_model_dir, text_file, hybrid_mask, tmp_path):
    from tilesparse.io.export import apply_mask_dir
    from tilesparse.io.quantized import load_quantized
    from tilesparse.models import find_prunable_linears, load_model

    out = tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", "--model", tiny_model_dir, "--mask", hybrid_mask, "--method",
                                "gptq", "--group-size", 48, "--calib-text", text_file, "--calib-samples", 2,
                                "--seqlen", 32, "--out", out, "--no-progress", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["quantization"]["bits"] == 4 and summary["quantization"]["group_size"] == 48
    assert summary["calibration"]["samples"] == 2 and not summary["fallback_layers"]
    assert abs(summary["sparsity"] - 0.3) < 0.05
    assert {p.name for p in out.iterdir()} >= {"masks.safetensors", "updated_weights.safetensors",
                                               "quantized.safetensors", "summary.json"}
    q = load_quantized(out)
    loaded = load_model(str(tiny_model_dir))
    ms, updated = apply_mask_dir(loaded, out)
    assert updated and ms.meta["quantization"]["method"] == "gptq"
    for l in find_prunable_linears(loaded.model):
        assert torch.equal(l.weight.detach(), q.layers[l.name].dequantize())  # exactly the codes' weights
        assert bool((l.weight[~ms.layers[l.name].to_bool()] == 0).all())
    quant = _eval(capsys, tiny_model_dir, text_file, "--mask", out)
    assert quant["model_state"] == (f"masked, {100 * ms.sparsity():.1f} % sparse, with the updated weights stored "
                                    "beside the mask (4-bit GPTQ, group 48, symmetric fake-quant)")
    masked = _eval(capsys, tiny_model_dir, text_file, "--mask", hybrid_mask)
    assert quant["perplexity"] != masked["perplexity"]


def test_dense_rtn_then_learn_on_it_is_refused(capsys, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "q8"
    code, stdout, err = run_cli(capsys, "quantize", "--model", tiny_model_dir, "--method", "rtn", "--bits", 8,
                                "--asymmetric", "--save-model", "--out", out, "--no-progress")
    assert code == 0, err
    assert "rtn w8 g128 asym (dense)" in stdout
    res = _eval(capsys, tiny_model_dir, text_file, "--mask", out)
    assert res["model_state"] == "dense, 8-bit RTN, group 128, asymmetric fake-quant"
    code, _, err = run_cli(capsys, "learn", "--model", out / "model", "--text", text_file, "--prior", "magnitude",
                           "--steps", 1, "--out", tmp_path / "learn")
    assert code == 2 and err.count("\n") == 1
    assert "learn needs the unquantized model, but this one holds 8-bit RTN" in err
    code, _, err = run_cli(capsys, "quantize", "--model", out / "model", "--method", "rtn", "--out", tmp_path / "again")
    assert code == 2 and "quantize needs the unquantized model" in err


@pytest.mark.parametrize("argv, msg", [
    (["--group-size", "0"], "'group_size' must be > 0, got 0"),
    (["--group-size", "-128"], "'group_size' must be > 0, got -128"),
    (["--bits", "5"], "bits must be one of 2, 3, 4, 8, got 5"),
    (["--calib-samples", "0"], "--calib-samples must be positive"),
    (["--calib-text", "prideprejudice"], "evaluation text"),
    (["--mask", "MASK", "--out", "MASK"], "--out must be another folder than the mask's"),
])
def test_bad_input_is_one_line(capsys, tiny_model_dir, hybrid_mask, tmp_path, argv, msg):
    argv = [str(hybrid_mask) if a == "MASK" else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = run_cli(capsys, "quantize", "--model", tiny_model_dir, *argv)
    assert code == 2 and err.count("\n") == 1 and msg in err, err


def test_4bit_export_ships_codes_and_runs_like_the_fake_quant_model(capsys, tiny_model_dir, text_file, hybrid_mask,
                                                                     tmp_path):
    """quantize (RTN, after a hybrid mask) -> export: the folder holds 4-bit layers (format version 2), loads
    with ``load_model`` and gives the logits of the fake-quantized model in bf16; vLLM's plugin refuses it."""
    from safetensors import safe_open

    from tilesparse.integrations.vllm import UnsupportedExport, read_packed_header
    from tilesparse.io.export import apply_mask_dir
    from tilesparse.kernels.linear_q4 import HybridLinearQ4
    from tilesparse.models import load_model

    q = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", "--model", tiny_model_dir, "--mask", hybrid_mask, "--method", "rtn",
                           "--group-size", 32, "--out", q, "--no-progress")
    assert code == 0, err
    out = tmp_path / "export"
    code, stdout, err = run_cli(capsys, "export", "--model", tiny_model_dir, "--mask", q, "--out", out)
    assert code == 0, err
    assert "4-bit codes" in stdout
    with safe_open(str(out / "model.packed.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["tilesparse"])
    assert meta["version"] == 2
    assert {info.get("format") for info in meta["layers"].values()} == {"q4"}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format_version"] == 2
    with pytest.raises(UnsupportedExport, match="4-bit"):
        read_packed_header(out / "model.packed.safetensors")

    shipped = load_model(str(out), dtype="bfloat16")
    q4 = {n: m for n, m in shipped.model.named_modules() if isinstance(m, HybridLinearQ4)}
    fake = load_model(str(tiny_model_dir))
    apply_mask_dir(fake, q)
    fake_linears = dict(fake.model.named_modules())
    assert q4 and all(torch.equal(m.weight, fake_linears[n].weight.detach()) for n, m in q4.items())
    ids = torch.randint(0, fake.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed_logits = shipped.model(ids).logits
        for n, m in q4.items():  # the same model with the dequantized weights as plain bf16 linears
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.bfloat16)
            lin.weight.copy_(m.weight)
            parent, _, child = n.rpartition(".")
            setattr(shipped.model.get_submodule(parent), child, lin)
        assert torch.equal(packed_logits, shipped.model(ids).logits)
