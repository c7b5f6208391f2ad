"""User-facing error types.

Anything a user can cause (bad file, bad config, bad shape, missing checkpoint) raises a subclass of
`CinemaError` with a one-line message naming the culprit; the CLI prints it and exits with code 2 instead of
showing a traceback. Programming errors stay ordinary exceptions.
"""


class CinemaError(Exception):
    """Base class: a problem with the user's input, printed as one line by the CLI."""


class DataError(CinemaError):
    """A data file is missing, truncated, corrupt, has the wrong dimensionality or holds NaN/Inf."""


class ConfigError(CinemaError):
    """An unknown config key, a value of the wrong type or range, or a config that cannot be loaded."""


class CheckpointError(CinemaError):
    """A checkpoint is missing, unreadable, or does not match the model/config it is restored into."""
