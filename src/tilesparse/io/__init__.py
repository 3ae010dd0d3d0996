"""tilesparse.io."""
