"""The models genforge knows, by name: where each one's config and network are defined, its family and a
one-line summary. Torch-free, so the CLI's ``--model`` choices and help come from here without importing
torch; ``registry.py`` imports the classes from it. Adding a model is its file in ``models/`` and one line
here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    module: str  # under genforge.models
    config: str  # the config dataclass's name in that module
    model: str  # the network's class name
    family: str  # "autoregressive" | "latent" | "gan"
    summary: str


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("pixelcnn", "pixelcnn", "PixelCNNConfig", "PixelCNN", "autoregressive",
                 "PixelCNN with residual blocks (van den Oord et al. 2016a)"),
    CatalogEntry("gated-pixelcnn", "gated_pixelcnn", "GatedPixelCNNConfig", "GatedPixelCNN", "autoregressive",
                 "Gated PixelCNN without the blind spot (van den Oord et al. 2016b)"),
    CatalogEntry("row-lstm", "pixelrnn", "PixelRNNConfig", "RowLSTM", "autoregressive",
                 "PixelRNN Row LSTM (van den Oord et al. 2016a)"),
    CatalogEntry("diagonal-bilstm", "pixelrnn", "PixelRNNConfig", "DiagonalBiLSTM", "autoregressive",
                 "PixelRNN Diagonal BiLSTM (van den Oord et al. 2016a)"),
    CatalogEntry("autoencoder", "latent", "AutoencoderConfig", "Autoencoder", "latent",
                 "Convolutional autoencoder with the L2 reconstruction loss"),
    CatalogEntry("vae", "latent", "VAEConfig", "VAE", "latent", "Variational autoencoder (Kingma & Welling 2014)"),
    CatalogEntry("gan", "gan", "GANConfig", "GAN", "gan",
                 "DCGAN (Radford et al. 2016) trained as in Goodfellow et al. 2014"),
)

MODEL_NAMES: tuple[str, ...] = tuple(e.name for e in CATALOG)
