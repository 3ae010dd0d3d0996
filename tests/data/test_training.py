"""Training sources: single texts, self-samples and weighted mixtures."""

import pytest
import torch

import tilesparse as ts
from tilesparse.data import check_training_source, parse_mixture, training_tokens
from tilesparse.data.training import mix_streams
from tilesparse.errors import TilesparseError


def test_parse_mixture():
    assert parse_mixture("austen-train") == [("austen-train", 1.0)]
    assert parse_mixture("austen-train@3, self:20k@1") == [("austen-train", 3.0), ("self:20k", 1.0)]


@pytest.mark.parametrize("source,msg", [
    ("austen-train@0.5,self:2k", "SOURCE@WEIGHT"),
    ("austen-train@half", "not a number"),
    ("austen-train@0,self:2k@1", "positive"),
    ("austen-train@-1", "positive"),
    ("emma@1,emma@2", "twice"),
    ("emma@1,mobydick@1", "evaluation text"),
    ("emma@1,no/such/file.txt@1", "neither an existing file"),
    ("", "non-empty"),
])
def test_bad_mixtures_are_one_line_errors(source, msg):
    with pytest.raises(TilesparseError, match=msg):
        check_training_source(source)


def test_mix_streams_follows_the_weights():
    a, b = torch.zeros(100, dtype=torch.long), torch.ones(20, dtype=torch.long)
    mixed = mix_streams([a, b], [1.0, 1.0])
    assert len(mixed) == 120 and int(mixed.sum()) == 60  # b repeated 3 times, a cut to 60
    mixed = mix_streams([a, b], [5.0, 1.0])
    assert int(mixed.sum()) == 20 and len(mixed) == 120


def test_a_mixture_of_a_file_and_self_samples(tiny_model_dir, text_file, tmp_cache):
    lm = ts.load_model(str(tiny_model_dir))
    plain = training_tokens(lm, str(text_file))
    mixed = training_tokens(lm, f"{text_file}@3,self:200@1", progress=False)
    assert len(mixed) == len(plain) + 200
    assert torch.equal(mixed[: len(mixed) * 3 // 4 - 1], plain[: len(mixed) * 3 // 4 - 1])
