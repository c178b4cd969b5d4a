"""Training's error classes, each one line for the user (the CLI prints them without a traceback)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing or malformed, or a data set request cannot be met."""


class CheckpointError(ValueError):
    """A run directory or checkpoint is missing, corrupt, foreign or of an unknown version."""


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, a resume that does not match the run)."""


class UsageError(ValueError):
    """The options asked for cannot be honoured (an existing output directory, a bad override)."""
