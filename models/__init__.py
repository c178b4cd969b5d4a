"""genforge.models: the networks, their configs, the likelihood heads and the model registry."""

from .base import AutoregressiveConfig, AutoregressiveModel, ConfigError, ImageConfig
from .gan import GAN, GANConfig
from .gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from .heads import LIKELIHOODS, make_head, nll_from_log_probs
from .latent import VAE, Autoencoder, AutoencoderConfig, LatentModel, VAEConfig
from .layers import MaskedConv2d, causal_mask, gate
from .pixelcnn import PixelCNN, PixelCNNConfig
from .pixelrnn import DiagonalBiLSTM, PixelRNNConfig, RowLSTM
from .registry import MODELS, ModelSpec, build_model, get_spec, make_config

__all__ = [
    "GAN",
    "LIKELIHOODS",
    "MODELS",
    "VAE",
    "Autoencoder",
    "AutoencoderConfig",
    "AutoregressiveConfig",
    "AutoregressiveModel",
    "ConfigError",
    "DiagonalBiLSTM",
    "GANConfig",
    "GatedPixelCNN",
    "GatedPixelCNNConfig",
    "ImageConfig",
    "LatentModel",
    "MaskedConv2d",
    "ModelSpec",
    "PixelCNN",
    "PixelCNNConfig",
    "PixelRNNConfig",
    "RowLSTM",
    "VAEConfig",
    "build_model",
    "causal_mask",
    "gate",
    "get_spec",
    "make_config",
    "make_head",
    "nll_from_log_probs",
]
