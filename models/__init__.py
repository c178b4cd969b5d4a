"""genforge.models: the networks, their configs, the likelihood heads and the model registry.

Names are imported on first use (PEP 562), so that ``genforge.models.catalog``, the torch-free list of
model names the CLI's ``--model`` choices come from, can be read without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    ".base": ("AutoregressiveConfig", "AutoregressiveModel", "ImageConfig"),
    ".errors": ("ConfigError",),
    ".gan": ("GAN", "GANConfig"),
    ".gated_pixelcnn": ("GatedPixelCNN", "GatedPixelCNNConfig"),
    ".heads": ("LIKELIHOODS", "make_head", "nll_from_log_probs"),
    ".latent": ("VAE", "Autoencoder", "AutoencoderConfig", "LatentModel", "VAEConfig"),
    ".layers": ("MaskedConv2d", "causal_mask", "gate"),
    ".pixelcnn": ("PixelCNN", "PixelCNNConfig"),
    ".pixelrnn": ("DiagonalBiLSTM", "PixelRNNConfig", "RowLSTM"),
    ".registry": ("MODELS", "ModelSpec", "build_model", "get_spec", "make_config"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(_MODULE_OF)
