"""One real-model check on the default SmolLM2 (marked slow): method ordering and mask-file application."""

from __future__ import annotations

import pytest
from tilesparse.paths import cache_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    if not (cache_dir() / "models" / "smollm2-135m-instruct-q4_1" / "config.json").is_file():
        pytest.skip("the default model is not cached (run the setup step)")
    from tilesparse.models import load_model

    return load_model()


def test_wanda_beats_magnitude_and_hybrid_beats_24(loaded, tmp_path):
    from tilesparse.data import eval_windows, load_text, tokenize
    from tilesparse.evaluation import perplexity
    from tilesparse.io import apply_mask_file, save_mask_artifact
    from tilesparse.models import find_prunable_linears
    from tilesparse.pruning import PruneConfig, calibration_ids, prune_model

    calib, _ = calibration_ids(loaded, "emma", samples=2, seqlen=128)
    text = load_text("prideprejudice").text[:20000]
    windows = eval_windows(tokenize(loaded.tokenizer, text), 256, 2)
    layers = find_prunable_linears(loaded.model)
    originals = {l.name: l.weight.detach().clone() for l in layers}

    def restore():
        for l in layers:
            l.set_weight(originals[l.name])

    def ppl(ms=None):
        if ms is not None:
            for l in layers:
                l.apply_mask(ms.layers[l.name].to_bool())
        p = perplexity(loaded.model, windows, progress=False).perplexity
        restore()
        return p

    mag = prune_model(loaded.model, None, PruneConfig(method="magnitude", pattern="2:4"), progress=False)
    wanda = prune_model(loaded.model, calib, PruneConfig(method="wanda", pattern="2:4"), progress=False)
    hybrid = prune_model(loaded.model, calib, PruneConfig(method="wanda", pattern="hybrid", sparsity=0.35),
                         progress=False)
    assert abs(hybrid.sparsity() - 0.35) < 1e-3
    p_dense, p_mag, p_wanda, p_hybrid = ppl(), ppl(mag), ppl(wanda), ppl(hybrid)
    assert p_dense < p_hybrid < p_wanda < p_mag

    save_mask_artifact(hybrid, tmp_path / "m")
    apply_mask_file(loaded, tmp_path / "m")  # checks the fingerprint of the (restored) base weights
    assert perplexity(loaded.model, windows, progress=False).perplexity == pytest.approx(p_hybrid, rel=1e-6)
    restore()
