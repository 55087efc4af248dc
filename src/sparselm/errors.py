"""Exceptions that mean "the user's input is wrong", reported by the CLI as one line instead of a traceback.

Kept free of heavy imports so the CLI can catch them without loading torch. Anything else that escapes a verb is a
bug in sparselm and shows its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: arguments, data files, prompts, results files (the message names the problem)."""


class ConfigError(InputError):
    """A configuration value is unknown, of the wrong type or inconsistent with another value."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the last good checkpoint is intact."""


# Set SPARSELM_DEBUG=1 to get the full traceback instead.
USER_ERRORS: tuple[type[BaseException], ...] = (InputError, CheckpointError, TrainingStopped, FileNotFoundError)


class DatabaseError(InputError):
    """A retrieval database (or neighbour table) is missing, corrupt, unfinished or does not fit the model."""
