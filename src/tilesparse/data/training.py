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
from .text import check_training_text, load_text, tokenize


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
    from pathlib import Path

    from .embedded import EMBEDDED_TEXTS
    from .text import GROUPS, HF_DATASETS

    for name, _ in parse_mixture(source):
        if parse_self_source(name) is not None:
            continue
        check_training_text(name, use=use)
        if name not in EMBEDDED_TEXTS and name not in GROUPS and name not in HF_DATASETS \
                and not Path(name).expanduser().is_file():
            raise TilesparseError(f"training text {name!r} is neither an existing file nor a known source")


def _one(loaded, name: str, seed: int, progress: bool) -> torch.Tensor:
    n = parse_self_source(name)
    if n is not None:
        return self_corpus(loaded, n, seed=seed, progress=progress)
    return tokenize(loaded.tokenizer, load_text(name).text)


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


def training_tokens(loaded, source: str, *, seed: int = 0, use: str = "train", progress: bool = True) -> torch.Tensor:
    """1-D int64 token ids of a source or mixture (see the module docstring) for a
    :class:`~tilesparse.models.LoadedModel`."""
    check_training_source(source, use=use)
    parts = parse_mixture(source)
    streams = [_one(loaded, name, seed, progress) for name, _ in parts]
    if len(parts) == 1:
        return streams[0]
    return mix_streams(streams, [w for _, w in parts])


def source_label(source: str) -> str:
    """A readable name of a source or mixture (for reports)."""
    parts = parse_mixture(source)
    if len(parts) == 1:
        name = parts[0][0]
        return name if parse_self_source(name) is not None else load_text(name).name
    wsum = sum(w for _, w in parts)
    return " + ".join(f"{100 * w / wsum:.0f} % {source_label(n)}" for n, w in parts)


__all__ = ["parse_mixture", "check_training_source", "mix_streams", "training_tokens", "source_label"]
