"""One registry from model name to its config class and constructor.

The run directory loader, the trainer and the Triton backend build models from this table, which is made
from ``catalog.py`` (the torch-free list the CLI's ``--model`` choices read).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

import torch
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


def estimate_size(name: str, config: ImageConfig | dict[str, Any], batch: int) -> tuple[int, int]:
    """(parameters, bytes of activations a training step at ``batch`` keeps) of model ``name``, found by
    building it and running its forward pass on the meta device: shapes only, nothing allocated."""
    cfg = config if isinstance(config, ImageConfig) else make_config(name, config)
    with torch.device("meta"):
        model = build_model(name, cfg)
    params = sum(p.numel() for p in model.parameters())
    kept = 0

    def count(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal kept
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                kept += t.numel() * t.element_size()

    forward = getattr(model, "estimate_forward", None)
    if forward is None and getattr(model, "family", "") != "autoregressive":
        return params, 0  # latent models and GANs: activations are small beside their weights here
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        x = torch.zeros((batch, cfg.channels, cfg.height, cfg.width), dtype=torch.long, device="meta")
        labels = torch.zeros(batch, dtype=torch.long, device="meta") if cfg.num_classes else None
        model(x, labels)
    finally:
        for h in hooks:
            h.remove()
    return params, kept
