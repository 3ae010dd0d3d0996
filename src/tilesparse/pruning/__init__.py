"""tilesparse.pruning."""
