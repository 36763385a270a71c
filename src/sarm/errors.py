"""One exception type for every error a user can act on (bad config, missing file, bad row)."""


class SarmError(Exception):
    """A user-facing error: its message names the key, file or row at fault, on one line."""
