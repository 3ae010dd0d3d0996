"""tilesparse.learning."""
