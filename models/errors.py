"""The models' error class: a config that names an unknown field or an inconsistent value."""

from __future__ import annotations


class ConfigError(ValueError):
    """A model config is inconsistent or names an unknown field."""
