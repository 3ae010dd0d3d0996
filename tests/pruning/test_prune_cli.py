"""``tilesparse prune`` and ``tilesparse eval --mask`` end to end on a tiny model with the real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from tilesparse.cli import main
from tilesparse.paths import cache_dir


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random LLaMA saved as an HF folder with the default model's tokenizer (when cached)."""
    import transformers as tf

    tok_dir = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip("the default model's tokenizer is not cached")
    tok = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tf.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_prune_then_eval_with_mask(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["prune", "--model", str(tiny_folder), "--method", "wanda", "--pattern", "hybrid",
               "--sparsity", "0.3", "--tile", "32", "--calib-text", "emma", "--calib-samples", "2",
               "--seqlen", "32", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "masks.safetensors").is_file()
    assert summary["pattern"] == "hybrid" and summary["tile"] == [32, 32]
    assert abs(summary["measured_sparsity"] - 0.3) < 0.05
    assert summary["calibration"]["samples"] == 2 and summary["calibration"]["seqlen"] == 32
    assert "wanda hybrid 30%" in capsys.readouterr().out
    rc = main(["eval", "--model", str(tiny_folder), "--mask", str(out), "--seqlen", "32", "--windows", "2",
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["windows"] == 2 and res["perplexity"] > 1


def test_update_weights_saves_model(tiny_folder, tmp_path, capsys):
    out = tmp_path / "sg"
    rc = main(["prune", "--model", str(tiny_folder), "--method", "sparsegpt", "--pattern", "2:4",
               "--update-weights", "--calib-text", "emma", "--calib-samples", "2", "--seqlen", "32",
               "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["measured_sparsity"] == 0.5
    assert (out / "model" / "config.json").is_file() and (out / "model" / "masks.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--pattern", "hybrid", "--sparsity", "0.7"], "[0, 0.5]"),
    (["--pattern", "hybrid"], "needs a target"),
    (["--pattern", "unstructured", "--sparsity", "1.0"], "[0, 1)"),
    (["--tile", "128x130"], "multiple of 4"),
    (["--method", "wanda", "--update-weights"], "sparsegpt"),
    (["--calib-samples", "0"], "positive"),
    (["--calib-text", "persuasion"], "evaluation text; calibrate on another text"),
    (["--calib-text", "emma@1,mobydick@1"], "evaluation text; calibrate on another text"),
])
def test_bad_input_is_one_line_error(tiny_folder, tmp_path, capsys, argv, message):
    rc = main(["prune", "--model", str(tiny_folder), "--out", str(tmp_path / "x"), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_short_calibration_text_and_foreign_mask(tiny_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    rc = main(["prune", "--model", str(tiny_folder), "--method", "wanda", "--calib-text", str(short),
               "--seqlen", "64", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "too short" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    rc = main(["eval", "--model", str(tiny_folder), "--mask", str(bad), "--seqlen", "32", "--windows", "1"])
    assert rc == 2 and "truncated or corrupt" in capsys.readouterr().err
