"""Text data: embedded books, files, HF datasets, text sampled from the model; windows and calibration
segments."""

from .embedded import AUSTEN, EMBEDDED_TEXTS, EVAL_TEXTS, OOD_EVAL_TEXTS, OPTIONAL_TEXTS, TRAIN_TEXTS, embedded_text
from .text import (TextSource, calibration_segments, check_training_text, eval_windows, list_sources, load_text,
                   tokenize)
from .training import check_training_source, parse_mixture, training_tokens

__all__ = [
    "AUSTEN", "EMBEDDED_TEXTS", "EVAL_TEXTS", "OOD_EVAL_TEXTS", "OPTIONAL_TEXTS", "TRAIN_TEXTS",
    "embedded_text",
    "TextSource", "calibration_segments", "check_training_text", "eval_windows", "list_sources", "load_text",
    "tokenize",
    "check_training_source", "parse_mixture", "training_tokens",
]
