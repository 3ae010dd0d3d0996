import pytest
import torch

from tilesparse.errors import TilesparseError
from tilesparse.models import load_model, model_context_length, resolve_dtype, weights_fingerprint
from tilesparse.models.embedded import DEFAULT_MODEL_NAME


def test_load_local_folder(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    assert lm.name == "tiny-llama" and not lm.model.training
    assert lm.tokenizer("ab")["input_ids"]
    assert model_context_length(lm.model) == 256
    assert lm.needs_bos is False


def test_load_bf16(tiny_model_dir):
    lm = load_model(tiny_model_dir, dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("spec,msg", [
    ("/no/such/model", "does not exist"),
    ("./missing-model", "does not exist"),
])
def test_missing_path(spec, msg):
    with pytest.raises(TilesparseError, match=msg):
        load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(TilesparseError, match="no config.json"):
        load_model(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(TilesparseError, match="not a .gguf"):
        load_model(f)


def test_unknown_dtype():
    with pytest.raises(TilesparseError, match="unknown dtype"):
        resolve_dtype("float8")


def test_fingerprint_changes_with_weights(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    a = weights_fingerprint(lm.model)
    assert a == weights_fingerprint(load_model(tiny_model_dir).model)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    assert weights_fingerprint(lm.model) != a


@pytest.mark.slow
def test_default_model_loads():
    lm = load_model()
    assert lm.name == DEFAULT_MODEL_NAME
    assert lm.model.config.num_hidden_layers == 30
    assert lm.model.config.hidden_size == 576


def test_unreachable_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TilesparseError, match="neither a local path nor reachable"):
        load_model("some-org/some-model-that-is-not-cached")
