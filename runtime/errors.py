"""The runtime's error classes, each one line for the user (the CLI prints them without a traceback)."""

from __future__ import annotations


class BundleError(ValueError):
    """A bundle is missing, truncated, tampered with, foreign or of an unknown version."""


class InputError(ValueError):
    """Arguments that do not fit the bundle (image shape, levels, labels)."""


class RuntimeBackendError(RuntimeError):
    """A backend cannot run here (missing package, no CUDA device) or cannot load a graph."""


class LockError(RuntimeError):
    """Another process holds the lock of a directory this one wants to write."""
