"""Text data: embedded books, files, HF datasets; windows and calibration segments."""

from .embedded import AUSTEN, EMBEDDED_TEXTS, EVAL_TEXTS, TRAIN_TEXTS, embedded_text
from .text import (TextSource, calibration_segments, check_training_text, eval_windows, list_sources, load_text,
                   tokenize)

__all__ = [
    "AUSTEN", "EMBEDDED_TEXTS", "EVAL_TEXTS", "TRAIN_TEXTS", "embedded_text",
    "TextSource", "calibration_segments", "check_training_text", "eval_windows", "list_sources", "load_text", "tokenize",
]
