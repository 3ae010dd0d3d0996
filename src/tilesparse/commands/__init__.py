"""Sub-commands of the ``tilesparse`` CLI; each module defines ``register(subparsers)``."""
