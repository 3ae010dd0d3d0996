"""Evaluation: perplexity under a pinned protocol."""

from .perplexity import PerplexityResult, evaluate_text, perplexity, window_nll

__all__ = ["PerplexityResult", "evaluate_text", "perplexity", "window_nll"]
