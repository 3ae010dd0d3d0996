"""tilesparse.models."""
