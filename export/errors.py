"""The exporter's error class."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Export failed, or the exported graph does not match eager PyTorch within the tolerance."""
