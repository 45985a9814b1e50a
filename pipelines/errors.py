"""Errors that the CLI reports as one line (no traceback) with a non-zero exit."""


class UniloomError(Exception):
    """A problem the user can fix: bad input, bad arguments, a missing resource."""


class ConfigError(UniloomError):
    """An unknown config key, a wrongly typed value, an unknown preset."""
