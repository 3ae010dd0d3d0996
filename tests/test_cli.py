import pytest

from tilesparse.cli import COMMANDS, main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_subcommand_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_eval_on_text_file(capsys, tiny_model_dir, text_file):
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--text", str(text_file),
                             "--seqlen", "64", "--windows", "3", "--json")
    assert code == 0, err
    import json

    res = json.loads(out)
    assert res["windows"] == 3 and res["seqlen"] == 64 and res["text"] == "text.txt"
    assert 1 < res["perplexity"] < 1e4


def test_info(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "info", "--model", str(tiny_model_dir), "--tile", "32", "--layers")
    assert code == 0, err
    assert "model.layers.1.mlp.down_proj" in out and "2x4" in out  # 64 x 128 with 32x32 tiles


@pytest.mark.parametrize("extra,msg", [
    (["--model", "/no/such/dir"], "does not exist"),
    (["--text", "/no/such/file.txt"], "neither an existing file nor a known source"),
    (["--seqlen", "0"], "at least 2"),
    (["--seqlen", "100000"], "exceeds the model's context"),
    (["--seqlen", "100000", "--windows", "-1"], "--windows"),
])
def test_eval_bad_input_is_one_line(capsys, tiny_model_dir, text_file, extra, msg):
    argv = ["eval", "--model", str(tiny_model_dir), "--text", str(text_file)]
    # later flags win in argparse, so extra overrides the defaults above
    code, out, err = run_cli(capsys, *argv, *extra)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0], err


def test_eval_empty_and_short_text(capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--text", str(empty))
    assert code == 2 and "is empty" in err
    short = tmp_path / "short.txt"
    short.write_text("only a few characters")
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--text", str(short),
                           "--seqlen", "128")
    assert code == 2 and "shorter than one window" in err


def test_info_bad_tile(capsys, tiny_model_dir):
    code, _, err = run_cli(capsys, "info", "--model", str(tiny_model_dir), "--tile", "64x30")
    assert code == 2 and "multiple of 4" in err


def test_generate_tiny(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "ab",
                             "--max-new-tokens", "5", "--no-chat")
    assert code == 0, err
    assert ": dense, 5 tokens" in out


@pytest.mark.parametrize("extra,msg", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--hybrid"], "--hybrid needs --mask"),
])
def test_generate_bad_input(capsys, tiny_model_dir, extra, msg):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), *extra)
    assert code == 2 and msg in err


def test_fetch_refuses_an_unknown_embedded_model_in_one_line(capsys, tmp_cache):
    code, out, err = run_cli(capsys, "fetch", "--model", "llama-70b")
    assert code != 0 and "not an embedded model" in err and "gemma3-270m" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_cache / "models").exists()  # refused before anything was fetched


def test_bench_reports_time_to_first_token_and_decode_rate(capsys, tiny_model_dir):
    import json

    code, out, err = run_cli(capsys, "bench", "--model", str(tiny_model_dir), "--prompt-tokens", "8",
                             "--new-tokens", "4", "--batch", "2", "--repeats", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["batch"] == 2 and res["new_tokens"] == 4 and res["ttft_ms"] > 0 and res["decode_tokens_per_s"] > 0
    assert res["decode_tokens_per_s_all"] == pytest.approx(2 * res["decode_tokens_per_s"], rel=1e-3)
    assert res["static_cache"] is False and res["torch.compile"] is False


@pytest.mark.parametrize("argv,msg", [
    (["--batch", "0"], "--batch must be positive"),
    (["--no-static-cache", "--compile"], "needs the static KV cache"),
    (["--static-cache", "--compile", "--cuda-graphs"], "CUDA graphs need a GPU"),
])
def test_bench_bad_input_is_one_line(capsys, tiny_model_dir, argv, msg):
    code, out, err = run_cli(capsys, "bench", "--model", str(tiny_model_dir), *argv)
    assert code != 0 and msg in err and len(err.strip().splitlines()) == 1
