"""Text sources, tokenization, evaluation windows and calibration segments.

A *text source* is a string naming where text comes from:

- an embedded book key (``prideprejudice``, ``persuasion``, ``emma``, ``mobydick``, ...) or
  ``debian-reference`` (prose of the Debian Reference manual: out-of-domain non-fiction, evaluation only),
- ``austen-train`` (Emma, Mansfield Park, Sense and Sensibility, Northanger Abbey) or ``austen-eval``
  (Pride and Prejudice, Persuasion),
- ``wikitext2`` or ``c4`` (through the ``datasets`` package, when installed and the hub reachable),
- a path to a UTF-8 text file (``.txt``; ``.jsonl`` takes each line's ``text`` field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TilesparseError
from .embedded import AUSTEN, EMBEDDED_TEXTS, EVAL_TEXTS, OOD_EVAL_TEXTS, TRAIN_TEXTS, embedded_text

GROUPS = {"austen-train": TRAIN_TEXTS, "austen-eval": EVAL_TEXTS}
HF_DATASETS = {
    # name: (dataset path, config, split, text field, separator)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    "wikitext2-train": ("wikitext", "wikitext-2-raw-v1", "train", "text", "\n\n"),
    "c4": ("allenai/c4", "en", "validation", "text", "\n\n"),
}


@dataclass(frozen=True)
class TextSource:
    """A named text."""

    name: str
    text: str


def list_sources() -> list[str]:
    """Names accepted by :func:`load_text` besides file paths."""
    return sorted(EMBEDDED_TEXTS) + sorted(GROUPS) + sorted(HF_DATASETS)


def load_hf_text(name: str) -> str:
    """Text of a Hugging Face dataset split listed in :data:`HF_DATASETS`, joined into one string."""
    path, config, split, field, sep = HF_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise TilesparseError(f"text {name!r} needs the 'datasets' package (pip install datasets)") from None
    try:
        if name == "c4":  # one validation shard is plenty for calibration or evaluation
            ds = datasets.load_dataset(path, data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       split=split)
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:
        raise TilesparseError(f"cannot load dataset {name!r} ({path}): {str(exc).splitlines()[0]}") from exc
    return sep.join(str(row[field]) for row in ds)


def check_text_source(source: str) -> None:
    """One-line :class:`TilesparseError` unless ``source`` names a known text or an existing file (nothing is
    read or fetched)."""
    if source in EMBEDDED_TEXTS or source in GROUPS or source in HF_DATASETS:
        return
    p = Path(source).expanduser()
    if not p.exists():
        raise TilesparseError(
            f"text {source!r} is neither an existing file nor a known source ({', '.join(list_sources())})"
        )
    if p.is_dir():
        raise TilesparseError(f"text file {p} is a directory")


def load_text(source: str) -> TextSource:
    """Resolve a text source (see module docstring) to its text; clear errors for bad input."""
    if source in EMBEDDED_TEXTS:
        text = embedded_text(source)
        name = EMBEDDED_TEXTS[source]
    elif source in GROUPS:
        text = "\n\n".join(embedded_text(k) for k in GROUPS[source])
        name = " + ".join(AUSTEN[k] for k in GROUPS[source])
    elif source in HF_DATASETS:
        text, name = load_hf_text(source), source
    else:
        check_text_source(source)
        p = Path(source).expanduser()
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TilesparseError(f"text file {p} is not UTF-8 text") from None
        if p.suffix.lower() == ".jsonl":
            try:
                raw = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TilesparseError(f"{p}: every JSONL line needs a 'text' field ({exc})") from None
        text, name = raw, p.name
    if not text.strip():
        raise TilesparseError(f"text {source!r} is empty")
    return TextSource(name=name, text=text)


HELD_OUT_TEXTS = (*EVAL_TEXTS, "austen-eval", *OOD_EVAL_TEXTS)  # evaluation only: in domain, and out of domain


def check_training_text(source: str, use: str = "train") -> None:
    """Refuse to learn (or calibrate, ``use='calibrate'``) on an evaluation text (one-line
    :class:`TilesparseError`)."""
    if source in HELD_OUT_TEXTS:
        raise TilesparseError(f"{source!r} is an evaluation text; {use} on another text (default austen-train)")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), as a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_seqlen(seqlen: int, context: int | None) -> None:
    if seqlen <= 1:
        raise TilesparseError(f"seqlen must be at least 2, got {seqlen}")
    if context is not None and seqlen > context:
        raise TilesparseError(f"seqlen {seqlen} exceeds the model's context length {context}")


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None, *,
                 bos_id: int | None = None, context: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` from the start of ``ids``.

    With ``bos_id`` each window is BOS followed by ``seqlen - 1`` text tokens. Raises when the text
    is shorter than one window.
    """
    _check_seqlen(seqlen, context)
    body = seqlen - 1 if bos_id is not None else seqlen
    n = ids.numel() // body
    if n == 0:
        raise TilesparseError(f"text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    if max_windows is not None:
        if max_windows <= 0:
            raise TilesparseError(f"number of windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    w = ids[: n * body].reshape(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


def calibration_segments(ids: torch.Tensor, n: int, seqlen: int, *, seed: int = 0,
                         bos_id: int | None = None, context: int | None = None) -> torch.Tensor:
    """``n`` random segments ``[n, seqlen]`` of ``ids`` (deterministic for a seed), BOS-prefixed if asked."""
    _check_seqlen(seqlen, context)
    if n <= 0:
        raise TilesparseError(f"number of calibration samples must be positive, got {n}")
    body = seqlen - 1 if bos_id is not None else seqlen
    if ids.numel() < body + 1:
        raise TilesparseError(
            f"calibration text has {ids.numel()} tokens, too short for segments of {seqlen} tokens"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (n,), generator=g)
    segs = torch.stack([ids[s: s + body] for s in starts.tolist()])
    if bos_id is not None:
        segs = torch.cat([torch.full((n, 1), bos_id, dtype=segs.dtype), segs], dim=1)
    return segs
