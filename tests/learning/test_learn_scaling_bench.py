"""``benchmarks/learn_scaling.py`` at a tiny scale on the CPU: both modes under torchrun with gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "learn_scaling.py"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny LLaMA with tied embeddings and a byte-level tokenizer as an HF folder, plus a training text."""
    import transformers as tf

    d = tmp_path / "tiny"
    make_byte_tokenizer().save_pretrained(d)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, vocab_size=256,
                         tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    text = d / "train.txt"
    text.write_text("It is a truth universally acknowledged, that a tiny model needs masks. " * 200)
    return d, text


def test_throughput_on_two_gloo_processes(tmp_path):
    out = tmp_path / "scaling.md"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
          "throughput", "--model", "tiny", "--steps", "3", "--warmup", "1", "--tile", "16", "--no-progress",
          "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in rows] == ["joint", "tile"]
    for r in rows:
        assert r["processes"] == 2 and r["sharded"] is True and r["tokens/step"] == 2 * 64
        assert r["tokens/s"] > 0 and len(r["per rank"]) == 2
        assert all(p["peak_steps_gib"] > 0 for p in r["per rank"])
        assert abs(r["sparsity"] - 0.45) < 0.05
    assert "| joint | 2 | True |" in out.read_text()


def test_final_masks_of_one_and_two_processes(tmp_path, tiny_dir):
    d, text = tiny_dir
    out = tmp_path / "compare.md"
    _run([sys.executable, str(SCRIPT), "compare", "--model", str(d), "--text", str(text), "--steps", "2",
          "--seqlen", "32", "--global-batch", "4", "--tile", "16", "--prior", "magnitude", "--sparsity", "0.3",
          "--eval-text", str(text), "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    rep = json.loads(out.with_suffix(".json").read_text())
    one, two = rep["summaries"]["1"], rep["summaries"]["2"]
    assert one["steps"] == two["steps"] == 2 and one["tokens"] == two["tokens"] == 2 * 4 * 32
    assert (one["processes"], one["sharded"], two["processes"], two["sharded"]) == (1, False, 2, True)
    for s in (one, two):
        assert abs(s["measured_sparsity"] - 0.3) < 0.05 and s["perplexity"][str(text)] > 0
    cmp = rep["comparisons"]["1 vs 2 processes"]
    assert cmp["tiles"] > 0 and 0 < cmp["tile_agreement"] <= 1 and 0 < cmp["pattern_agreement"] <= 1
    assert "2 process(es) vs the prior" in rep["comparisons"]
    assert (tmp_path / "runs" / "procs2" / "masks.safetensors").is_file()
    assert not (tmp_path / "runs" / "procs2" / "checkpoint.dcp").exists()
