"""The one exception type of the data package: a problem with a user's file, named in the message."""


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line/key) and the fix."""
