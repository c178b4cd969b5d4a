"""One registry from model name to its config class and constructor.

The run directory loader, the trainer and the Triton backend build models from this table; the CLI's
``--model`` choices mirror it without importing torch (``cli/common.MODEL_CHOICES``, tied to it by a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import ConfigError, ImageConfig
from .gan import GAN, GANConfig
from .gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from .latent import VAE, Autoencoder, AutoencoderConfig, VAEConfig
from .pixelcnn import PixelCNN, PixelCNNConfig
from .pixelrnn import DiagonalBiLSTM, PixelRNNConfig, RowLSTM


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type[ImageConfig]
    model_cls: type[nn.Module]
    family: str  # "autoregressive" | "latent" | "gan"
    summary: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("pixelcnn", PixelCNNConfig, PixelCNN, "autoregressive",
                  "PixelCNN with residual blocks (van den Oord et al. 2016a)"),
        ModelSpec("gated-pixelcnn", GatedPixelCNNConfig, GatedPixelCNN, "autoregressive",
                  "Gated PixelCNN without the blind spot (van den Oord et al. 2016b)"),
        ModelSpec("row-lstm", PixelRNNConfig, RowLSTM, "autoregressive",
                  "PixelRNN Row LSTM (van den Oord et al. 2016a)"),
        ModelSpec("diagonal-bilstm", PixelRNNConfig, DiagonalBiLSTM, "autoregressive",
                  "PixelRNN Diagonal BiLSTM (van den Oord et al. 2016a)"),
        ModelSpec("autoencoder", AutoencoderConfig, Autoencoder, "latent",
                  "Convolutional autoencoder with the L2 reconstruction loss"),
        ModelSpec("vae", VAEConfig, VAE, "latent", "Variational autoencoder (Kingma & Welling 2014)"),
        ModelSpec("gan", GANConfig, GAN, "gan", "DCGAN (Radford et al. 2016) trained as in Goodfellow et al. 2014"),
    )
}


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
