"""Training text sampled from the model itself (``self:N``)."""

import pytest
import torch

import tilesparse as ts
from tilesparse.data import check_training_source, training_tokens
from tilesparse.data import self_sample
from tilesparse.data.self_sample import parse_self_source, sample_tokens, self_corpus
from tilesparse.errors import TilesparseError


@pytest.mark.parametrize("source,n", [("self:20000", 20000), ("self:20k", 20000), ("self:1.5M", 1500000),
                                      ("austen-train", None), ("self-made.txt", None)])
def test_parse_self_source(source, n):
    assert parse_self_source(source) == n


@pytest.mark.parametrize("source", ["self:", "self:many", "self:0", "self:-5"])
def test_bad_self_source_is_one_line_error(source):
    with pytest.raises(TilesparseError, match="self:N"):
        check_training_source(source)


def test_evaluation_texts_stay_refused():
    with pytest.raises(TilesparseError, match="evaluation text; calibrate on another"):
        check_training_source("mobydick", use="calibrate")


def test_sampling_is_seeded_and_sized(tiny_model_dir):
    lm = ts.load_model(str(tiny_model_dir))
    a = sample_tokens(lm.model, lm.tokenizer, 300, seqlen=24, batch=4, seed=1, progress=False)
    b = sample_tokens(lm.model, lm.tokenizer, 300, seqlen=24, batch=4, seed=1, progress=False)
    c = sample_tokens(lm.model, lm.tokenizer, 300, seqlen=24, batch=4, seed=2, progress=False)
    assert a.dtype == torch.long and a.shape == (300,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < len(lm.tokenizer)


def test_repetitive_sequences_are_dropped():
    seen = set()
    assert not self_sample._usable([5] * 40, seen)  # one token repeated
    assert self_sample._usable(list(range(40)), seen)
    assert not self_sample._usable(list(range(40)), seen)  # a duplicate of an earlier sequence


def test_the_corpus_is_cached_per_model_and_setting(tiny_model_dir, tmp_cache, monkeypatch):
    lm = ts.load_model(str(tiny_model_dir))
    calls = []
    real = self_sample.sample_tokens

    def counting(*a, **k):
        calls.append(k.get("seed"))
        return real(*a, **k)

    monkeypatch.setattr(self_sample, "sample_tokens", counting)
    first = self_corpus(lm, 200, seqlen=24, batch=4, progress=False)
    again = training_tokens(lm, "self:200", progress=False)  # default settings of the training source
    assert torch.equal(first, self_corpus(lm, 200, seqlen=24, batch=4, progress=False))
    assert len(calls) == 2 and again.shape == (200,)  # the repeated setting came from the cache
    assert len(list((tmp_cache / "self-samples").glob("*.pt"))) == 2
    with torch.no_grad():  # other weights: another corpus
        for layer in lm.model.model.layers:
            layer.mlp.up_proj.weight.add_(0.5)
    self_corpus(lm, 200, seqlen=24, batch=4, progress=False)
    assert len(calls) == 3


def test_a_corpus_drawn_with_another_batch_size_is_reused(tiny_model_dir, tmp_cache, monkeypatch):
    lm = ts.load_model(str(tiny_model_dir))
    gpu_draw = self_corpus(lm, 120, seqlen=24, batch=8, progress=False)  # as a GPU would draw it
    monkeypatch.setattr(self_sample, "sample_tokens", lambda *a, **k: pytest.fail("sampled again"))
    assert torch.equal(self_corpus(lm, 120, seqlen=24, batch=2, progress=False), gpu_draw)
    with pytest.raises(pytest.fail.Exception):  # any other setting is another corpus
        self_corpus(lm, 120, seqlen=24, batch=2, seed=1, progress=False)


def test_learning_on_self_samples(tiny_model_dir, tmp_cache):
    lm = ts.load_model(str(tiny_model_dir))
    res = ts.learn(lm, mode="joint", sparsity=0.3, text="self:600", prior="wanda", calib_samples=2,
                   calib_seqlen=32, steps=2, batch=2, seqlen=32, tile=(32, 32), loss="kd", progress=False)
    assert abs(res.maskset.sparsity() - 0.3) < 0.05
