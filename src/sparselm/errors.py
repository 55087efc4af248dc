"""Exceptions that mean "the user's input is wrong", reported by the CLI as one line instead of a traceback.

Kept free of heavy imports so the CLI can catch them without loading torch.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the last good checkpoint is intact."""


# ValueError covers bad data and bad arguments raised with a message by our own modules.
# Set SPARSELM_DEBUG=1 to get the full traceback instead.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, TrainingStopped, FileNotFoundError, ValueError)
