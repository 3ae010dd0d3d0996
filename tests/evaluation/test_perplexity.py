import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tilesparse.evaluation import perplexity
from tilesparse.errors import TilesparseError


class KnownLM(nn.Module):
    """Predicts the true next token (ids increase by one) with probability ``p``, rest uniform."""

    def __init__(self, vocab: int, p: float | None):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        b, t = input_ids.shape
        if self.p is None:  # uniform
            logits = torch.zeros(b, t, self.vocab)
        else:
            q = (1 - self.p) / (self.vocab - 1)
            probs = torch.full((b, t, self.vocab), q)
            probs.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.p)
            logits = probs.log()
        return SimpleNamespace(logits=logits)


def windows(n=3, t=16, vocab=50):
    return (torch.arange(n * t) % vocab).reshape(n, t)


def test_uniform_model_has_perplexity_vocab():
    res = perplexity(KnownLM(50, None), windows(), progress=False)
    assert res.perplexity == pytest.approx(50.0, rel=1e-6)
    assert res.tokens_scored == 3 * 15 and res.windows == 3 and res.seqlen == 16


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_known_probability(p):
    res = perplexity(KnownLM(50, p), windows(), progress=False, batch_size=2)
    assert res.perplexity == pytest.approx(1 / p, rel=1e-5)
    assert res.nll == pytest.approx(-math.log(p), rel=1e-5)


def test_batch_size_does_not_change_result(tiny_llama):
    w = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    a = perplexity(tiny_llama, w, batch_size=1, progress=False).perplexity
    b = perplexity(tiny_llama, w, batch_size=4, progress=False).perplexity
    assert a == pytest.approx(b, rel=1e-5)


def test_non_finite_logits_are_reported():
    class NaNLM(KnownLM):
        def forward(self, input_ids, use_cache=False):
            out = super().forward(input_ids)
            out.logits[:] = float("nan")
            return out

    with pytest.raises(TilesparseError, match="non-finite"):
        perplexity(NaNLM(10, None), windows(vocab=10), progress=False)


def test_result_records_protocol():
    res = perplexity(KnownLM(50, None), windows(), model_name="m", text_name="t", bos=True, progress=False)
    d = res.to_dict()
    assert d["model"] == "m" and d["text"] == "t" and d["bos"] is True and d["windows"] == 3
    assert "3 x 16" in str(res)


@pytest.mark.slow
def test_default_model_perplexity_on_pride_and_prejudice():
    from tilesparse.evaluation import evaluate_text
    from tilesparse.models import load_model

    res = evaluate_text(load_model(), "prideprejudice", seqlen=512, max_windows=10, progress=False)
    assert res.windows == 10 and res.seqlen == 512
    assert 15 < res.perplexity < 35
