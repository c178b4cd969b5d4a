"""One registry from model name to its config class and constructor.

The run directory loader, the trainer and the Triton backend build models from this table, which is made
from ``catalog.py`` (the torch-free list the CLI's ``--model`` choices read).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from torch import nn

from .base import ImageConfig
from .catalog import CATALOG, CatalogEntry
from .errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type[ImageConfig]
    model_cls: type[nn.Module]
    family: str  # "autoregressive" | "latent" | "gan"
    summary: str


def _spec(entry: CatalogEntry) -> ModelSpec:
    module = import_module(f"genforge.models.{entry.module}")
    return ModelSpec(entry.name, getattr(module, entry.config), getattr(module, entry.model), entry.family,
                     entry.summary)


MODELS: dict[str, ModelSpec] = {e.name: _spec(e) for e in CATALOG}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def make_config(name: str, values: dict[str, Any] | None = None) -> ImageConfig:
    """The validated config of model ``name`` from a dict (unknown keys are an error)."""
    return get_spec(name).config_cls.from_dict(dict(values or {}))


def build_model(name: str, config: ImageConfig | dict[str, Any] | None = None) -> nn.Module:
    spec = get_spec(name)
    if not isinstance(config, ImageConfig):
        config = make_config(name, config)
    elif not isinstance(config, spec.config_cls):
        raise ConfigError(f"model {name!r} needs a {spec.config_cls.__name__}, got {type(config).__name__}")
    return spec.model_cls(config)
