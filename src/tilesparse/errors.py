"""Exceptions for user mistakes: the CLI prints them as one line and exits non-zero."""


class TilesparseError(Exception):
    """A problem with the user's input or environment (bad path, bad value, unreachable source).

    Raised for anything a user can fix; the CLI prints ``error: <message>`` and exits with status 2.
    Programming errors stay ordinary exceptions with a traceback.
    """
