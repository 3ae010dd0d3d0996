"""The token stream a model learns (or is calibrated) on.

A source is a text name or file (:func:`~.text.load_text`), ``self:N`` (N tokens sampled from the model
itself, :mod:`.self_sample`), or a **mixture** of those with weights: ``"austen-train@0.5,self:200k@0.5"``.
A mixture's stream holds each source in proportion to its weight (a source shorter than its share is
repeated, a longer one cut), so training windows drawn uniformly from it follow the weights. Its length is
the sum of the sources' lengths. Evaluation texts are refused, in a mixture too.
"""

from __future__ import annotations

import torch

from ..errors import TilesparseError
from .self_sample import parse_self_source, self_corpus
from .text import check_text_source, check_training_text, load_text, tokenize


def parse_mixture(source: str) -> list[tuple[str, float]]:
    """``"a@0.7,b@0.3"`` -> ``[("a", 0.7), ("b", 0.3)]``; a single source (no ``,`` or ``@``) has weight 1.
    Weights must be positive numbers."""
    if not isinstance(source, str) or not source.strip():
        raise TilesparseError("a training source must be a non-empty string")
    if "," not in source and "@" not in source:
        return [(source, 1.0)]
    parts = []
    for item in source.split(","):
        name, at, weight = item.strip().rpartition("@")
        if not at or not name:
            raise TilesparseError(f"training mixture {source!r}: write every part as SOURCE@WEIGHT "
                                  f"(e.g. austen-train@0.5,self:200k@0.5), got {item.strip()!r}")
        try:
            w = float(weight)
        except ValueError:
            raise TilesparseError(f"training mixture {source!r}: weight {weight!r} is not a number") from None
        if not w > 0 or w == float("inf"):
            raise TilesparseError(f"training mixture {source!r}: weights must be positive, got {weight}")
        parts.append((name.strip(), w))
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise TilesparseError(f"training mixture {source!r} names a source twice")
    return parts


def check_training_source(source: str, use: str = "train") -> None:
    """One-line :class:`~tilesparse.errors.TilesparseError` for a malformed source or mixture, an evaluation
    text, or a file that does not exist, without loading a model."""
    for name, _ in parse_mixture(source):
        if parse_self_source(name) is None:
            check_training_text(name, use=use)
            check_text_source(name)


def _one(loaded, name: str, seed: int, progress: bool) -> tuple[torch.Tensor, str]:
    n = parse_self_source(name)
    if n is not None:
        return self_corpus(loaded, n, seed=seed, progress=progress), name
    src = load_text(name)
    return tokenize(loaded.tokenizer, src.text), src.name


def mix_streams(streams: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """One stream with ``streams[i]`` taking ``weights[i] / sum(weights)`` of its length (repeated or cut);
    the length is the sum of the streams' lengths."""
    total = sum(len(s) for s in streams)
    wsum = sum(weights)
    parts = []
    for s, w in zip(streams, weights):
        share = max(1, round(total * w / wsum))
        reps = -(-share // len(s))
        parts.append(s.repeat(reps)[:share])
    return torch.cat(parts)


def load_training(loaded, source: str, *, seed: int = 0, use: str = "train",
                  progress: bool = True) -> tuple[torch.Tensor, str]:
    """1-D int64 token ids of a source or mixture (see the module docstring) for a
    :class:`~tilesparse.models.LoadedModel`, and a readable name of it (for reports)."""
    check_training_source(source, use=use)
    parts = parse_mixture(source)
    loaded_parts = [_one(loaded, name, seed, progress) for name, _ in parts]
    if len(parts) == 1:
        return loaded_parts[0]
    weights = [w for _, w in parts]
    label = " + ".join(f"{100 * w / sum(weights):.0f} % {name}" for (_, name), w in zip(loaded_parts, weights))
    return mix_streams([ids for ids, _ in loaded_parts], weights), label


def training_tokens(loaded, source: str, *, seed: int = 0, use: str = "train", progress: bool = True) -> torch.Tensor:
    """1-D int64 token ids of a source or mixture (see :func:`load_training`)."""
    return load_training(loaded, source, seed=seed, use=use, progress=progress)[0]


__all__ = ["parse_mixture", "check_training_source", "mix_streams", "load_training", "training_tokens"]
