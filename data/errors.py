class DataError(RuntimeError):
    """A dataset that cannot be found or read; the message says how to get it."""
