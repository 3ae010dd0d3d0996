"""The public API as users call it: ``import tilesparse as ts``."""

import os
import re
from pathlib import Path

import pytest
import torch

import tilesparse as ts

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_public_api_is_documented():
    assert ts.__doc__ and "Quick start" in ts.__doc__
    for name in ts.__all__:
        if name != "__version__":
            assert getattr(ts, name).__doc__, f"tilesparse.{name} has no docstring"


def test_prune_evaluate_save_export_on_a_tiny_model(tiny_model_dir, text_file, tmp_path):
    lm = ts.load_model(str(tiny_model_dir))
    masks = ts.prune(lm, method="wanda", pattern="hybrid", sparsity=0.3, tile=32, calibration=str(text_file),
                     samples=2, seqlen=32, progress=False)
    assert abs(masks.sparsity() - 0.3) < 0.05
    dense = ts.perplexity(lm, str(text_file), seqlen=64, windows=2, progress=False).perplexity
    ts.save_masks(masks, tmp_path / "m")
    back = ts.load_masks(tmp_path / "m", lm)  # checked against the weights it was made for
    assert {n: m.to_bool() for n, m in back.layers.items()}.keys() == masks.layers.keys()
    ts.apply_masks(lm, masks)
    masked = ts.perplexity(lm, str(text_file), seqlen=64, windows=2, progress=False).perplexity
    assert masked != dense
    info = ts.export(lm, masks, tmp_path / "packed")
    assert info["file_bytes"] < info["dense_bf16_bytes"]
    shipped = ts.perplexity(ts.load_model(str(tmp_path / "packed")), str(text_file), seqlen=64, windows=2,
                            progress=False).perplexity
    assert shipped == pytest.approx(masked, rel=0.02)


def test_learn_returns_the_mask_and_its_prior(tiny_model_dir, text_file):
    lm = ts.load_model(str(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = ts.learn(lm, mode="joint", sparsity=0.3, text=str(text_file), prior="magnitude", steps=2, batch=2,
                   seqlen=32, tile=(32, 32), progress=False)
    assert abs(res.maskset.sparsity() - 0.3) < 0.05 and abs(res.prior.sparsity() - 0.3) < 0.05
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # weights frozen
    with pytest.raises(ts.TilesparseError, match="evaluation text"):
        ts.learn(lm, text="persuasion")


def test_learn_trains_models_that_need_bos_on_bos_windows(text_file, monkeypatch):
    from conftest import make_char_tokenizer, make_tiny_model
    from tilesparse.learning import trainer
    from tilesparse.models import LoadedModel

    tok = make_char_tokenizer()
    lm = LoadedModel(make_tiny_model("gemma3"), tok, "tiny-gemma", "memory")
    assert lm.needs_bos and lm.bos_id == tok.bos_token_id
    batches = []
    real = trainer.WindowSampler.batch
    monkeypatch.setattr(trainer.WindowSampler, "batch",
                        lambda self, first, size: batches.append(real(self, first, size)) or batches[-1])
    ts.learn(lm, mode="joint", sparsity=0.3, text=str(text_file), prior="magnitude", steps=2, batch=2,
             seqlen=32, tile=(32, 32), progress=False)
    assert batches and all((b[:, 0] == tok.bos_token_id).all() for b in batches)


def test_configs_as_objects(tiny_model_dir, text_file):
    lm = ts.load_model(str(tiny_model_dir))
    cfg = ts.PruneConfig(method="magnitude", pattern="hybrid", sparsity=0.25, tile=32)
    masks = ts.prune(lm, cfg, progress=False)
    assert abs(masks.sparsity() - 0.25) < 0.05
    with pytest.raises(ts.TilesparseError, match="not both"):
        ts.prune(lm, cfg, method="wanda")
    with pytest.raises(ts.TilesparseError, match="takes a PruneConfig"):
        ts.prune(lm, ts.LearnConfig())
    with pytest.raises(ts.TilesparseError, match="'sparsity' must be <= 0.5"):
        ts.LearnConfig(sparsity=0.7)
    res = ts.learn(lm, ts.LearnConfig(mode="tile", sparsity=0.3, text=str(text_file), prior="magnitude", steps=1,
                                      batch=1, seqlen=32, tile=(32, 32)), progress=False)
    assert abs(res.maskset.sparsity() - 0.3) < 0.05


@pytest.mark.slow
def test_readme_python_quick_start_runs(tmp_path, monkeypatch):
    """The README's Python block, as written, on the embedded model."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "w35" / "masks.safetensors").is_file()
    assert (tmp_path / "runs" / "w35-packed" / "model.packed.safetensors").is_file()
