"""tilesparse.evaluation."""
