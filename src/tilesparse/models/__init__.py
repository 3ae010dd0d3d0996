"""Model loading (folders, GGUF, hub ids, embedded default) and discovery of prunable linears."""

from .discovery import PrunableLinear, find_decoder_blocks, find_prunable_linears, is_linear
from .loading import LoadedModel, load_model, model_context_length, resolve_dtype, weights_fingerprint

__all__ = [
    "PrunableLinear", "find_decoder_blocks", "find_prunable_linears", "is_linear",
    "LoadedModel", "load_model", "model_context_length", "resolve_dtype", "weights_fingerprint",
]
