"""tilesparse.data."""
