"""tilesparse: learnable tile-level hybrid (dense / 2:4) sparsity for LLMs."""

__version__ = "0.1.0"
