"""tilesparse.kernels."""
