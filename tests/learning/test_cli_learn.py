import json

import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_model
from tilesparse.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny LLaMA with a byte-level tokenizer saved as an HF folder, plus a training text file."""
    d = tmp_path_factory.mktemp("tiny")
    make_byte_tokenizer().save_pretrained(d)
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=256)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    text = d / "train.txt"
    text.write_text("It is a truth universally acknowledged, that a tiny model needs masks. " * 200)
    return d, text


def _args(model_dir, text, out, *extra):
    return ["learn", "--model", str(model_dir), "--text", str(text), "--mode", "joint", "--sparsity", "0.3",
            "--steps", "2", "--seqlen", "32", "--batch", "2", "--prior", "magnitude", "--tile", "16",
            "--no-progress", "--out", str(out), *extra]


def test_learn_cli_writes_masks_and_resumes(tiny_dir, tmp_path, capsys):
    d, text = tiny_dir
    out = tmp_path / "run"
    assert main(_args(d, text, out, "--json", "--keep-checkpoint")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and abs(summary["measured_sparsity"] - 0.3) < 0.05
    assert (out / "masks.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    # the same --out again is refused; --resume of the finished run returns its result
    assert main(_args(d, text, out)) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["learn", "--model", str(d), "--resume", str(out), "--no-progress", "--json", "--keep-checkpoint"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["measured_sparsity"] == summary["measured_sparsity"]
    # resuming with a changed setting is a one-line error
    assert main(["learn", "--model", str(d), "--resume", str(out), "--sparsity", "0.45"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume") and "\n" not in err
    # so is sharding a run whose checkpoint is a single file
    assert main(["learn", "--model", str(d), "--resume", str(out), "--shard", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "comes from an unsharded run" in err and "\n" not in err


def test_learn_cli_sharded_checkpoint(tiny_dir, tmp_path, capsys):
    d, text = tiny_dir
    out = tmp_path / "run"
    assert main(_args(d, text, out, "--json", "--shard", "--keep-checkpoint")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (out / "checkpoint.dcp" / "meta.pt").is_file() and not (out / "checkpoint.pt").exists()
    assert main(_args(d, text, out)) == 2
    assert "already holds" in capsys.readouterr().err
    # another global batch is refused in one line; the same one resumes (here: the finished run)
    assert main(["learn", "--model", str(d), "--resume", str(out), "--batch", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sequences per step" in err and "\n" not in err
    assert main(["learn", "--model", str(d), "--resume", str(out), "--no-progress", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["measured_sparsity"] == summary["measured_sparsity"]
    assert not (out / "checkpoint.dcp").exists()  # removed once done (no --keep-checkpoint)


def test_learn_cli_removes_its_checkpoint_when_done(tiny_dir, tmp_path, capsys):
    from tilesparse.io import load_mask_artifact

    d, text = tiny_dir
    out = tmp_path / "run"
    assert main(_args(d, text, out, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not (out / "checkpoint.pt").exists() and "checkpoint" not in summary["files"]
    assert (out / "masks.safetensors").is_file()
    prior = load_mask_artifact(out / "prior")  # what learning started from, for comparison
    assert abs(prior.sparsity() - 0.3) < 0.05
    assert main(_args(d, text, out)) == 2  # a finished run is not overwritten
    assert "already holds a finished learning run" in capsys.readouterr().err


def test_learn_cli_distills_and_refits(tiny_dir, tmp_path, capsys):
    from tilesparse.io.export import UPDATED_WEIGHTS

    d, text = tiny_dir
    out = tmp_path / "run"
    assert main(_args(d, text, out, "--json", "--loss", "kd", "--refit",
                             "--calib-samples", "2", "--calib-seqlen", "64")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["final"]["kd"] > 0 and (out / UPDATED_WEIGHTS).is_file()
    assert summary["files"]["updated_weights"] == str(out / UPDATED_WEIGHTS)
    assert main(["eval", "--model", str(d), "--mask", str(out), "--text", str(text), "--seqlen", "32",
                 "--windows", "2"]) == 0
    assert "with the updated weights" in capsys.readouterr().out


def test_learn_cli_refit_keeping_the_tile_map(tiny_dir, tmp_path, capsys):
    from tilesparse.io import load_mask_artifact
    from tilesparse.io.export import UPDATED_WEIGHTS

    d, text = tiny_dir
    out = tmp_path / "run"
    assert main(_args(d, text, out, "--json", "--refit", "tiles", "--calib-samples", "2",
                      "--calib-seqlen", "64")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"]["refit_masks"] and (out / "refit" / UPDATED_WEIGHTS).is_file()
    assert not (out / UPDATED_WEIGHTS).exists()  # the learned mask beside it stays mask only
    learned, refit = load_mask_artifact(out), load_mask_artifact(out / "refit")
    assert all(torch.equal(learned.layers[n].tile_kinds(), refit.layers[n].tile_kinds()) for n in learned.layers)
    assert main(["eval", "--model", str(d), "--mask", str(out / "refit"), "--text", str(text), "--seqlen", "32",
                 "--windows", "2"]) == 0
    assert "with the updated weights" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [(["--sparsity", "0.7"], "sparsity"), (["--steps", "0"], "steps"),
                                       (["--text", "prideprejudice"], "evaluation text"),
                                       (["--text", "mobydick"], "evaluation text"),
                                       (["--text", "emma@1,debian-reference@1"], "evaluation text"),
                                       (["--text", "self:lots"], "self:N")])
def test_learn_cli_bad_input(tiny_dir, tmp_path, capsys, extra, msg):
    d, text = tiny_dir
    args = _args(d, text, tmp_path / "x")
    # later options win in argparse
    assert main(args + extra) == 2
    assert msg in capsys.readouterr().err


def test_learn_cli_needs_out(capsys):
    assert main(["learn"]) == 2
    assert "--out" in capsys.readouterr().err
