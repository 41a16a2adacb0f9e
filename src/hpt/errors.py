"""User-facing errors.

Anything a user can cause (a bad config key, a malformed data file, an unknown algorithm, a model
without a chat template) raises a subclass of :class:`HPTError` with one line that names the
problem and where it is. The command line prints that line and exits with code 2; any other
exception is an internal error (exit code 1).
"""

from __future__ import annotations


class HPTError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class ConfigError(HPTError, ValueError):
    """A bad configuration: unknown key, wrong type, unknown algorithm or component name."""


class DataError(HPTError, ValueError):
    """A bad data file or row: names the file, the row and the field."""


class ModelError(HPTError):
    """A model or tokenizer that cannot be used as asked (missing, no chat template, ...)."""


class RewardError(HPTError):
    """A reward function that cannot be found or imported."""
