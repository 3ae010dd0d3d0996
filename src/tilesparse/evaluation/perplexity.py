"""Perplexity with a pinned protocol.

Protocol: tokenize the whole text once (no special tokens); cut non-overlapping windows of ``seqlen``
tokens from the start (BOS + ``seqlen-1`` tokens per window when the model needs BOS); score every
window independently; perplexity = exp(mean NLL over all predicted tokens) (``seqlen - 1`` per window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import TilesparseError


@dataclass
class PerplexityResult:
    """A perplexity number and everything needed to reproduce it."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    model: str
    text: str
    seqlen: int
    windows: int
    tokens_scored: int
    bos: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.3f}  ({self.model} on {self.text}: {self.windows} x "
                f"{self.seqlen} tokens{', BOS per window' if self.bos else ''}, {self.seconds:.1f} s)")


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Sum of token NLLs and number of predicted tokens over ``windows [n, seqlen]``."""
    if batch_size <= 0:
        raise TilesparseError(f"batch size must be positive, got {batch_size}")
    device = _model_device(model)
    total, count = 0.0, 0
    bar = tqdm(total=windows.shape[0], desc=desc, unit="win", disable=not progress, leave=False)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start: start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        pred = logits[:, :-1].float()
        tgt = batch[:, 1:]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise TilesparseError("the model produced non-finite log-probabilities (NaN/inf)")
        total += float(nll)
        count += tgt.numel()
        bar.update(batch.shape[0])
    bar.close()
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, *, model_name: str = "model", text_name: str = "text",
               bos: bool = False, batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on pre-cut ``windows`` (see :func:`tilesparse.data.eval_windows`)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        total, count = window_nll(model, windows, batch_size=batch_size, progress=progress)
    finally:
        model.train(was_training)
    nll = total / count
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, model=model_name, text=text_name, seqlen=int(windows.shape[1]),
        windows=int(windows.shape[0]), tokens_scored=count, bos=bos, seconds=time.perf_counter() - t0,
    )


def evaluate_text(loaded, source: str, *, seqlen: int = 512, max_windows: int | None = 10,
                  batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of a :class:`~tilesparse.models.LoadedModel` on a text source under the pinned protocol."""
    from ..data import eval_windows, load_text, tokenize
    from ..models import model_context_length

    src = load_text(source)
    ids = tokenize(loaded.tokenizer, src.text)
    bos_id = loaded.bos_id
    windows = eval_windows(ids, seqlen, max_windows, bos_id=bos_id, context=model_context_length(loaded.model))
    return perplexity(loaded.model, windows, model_name=loaded.name, text_name=src.name,
                      bos=bos_id is not None, batch_size=batch_size, progress=progress)
