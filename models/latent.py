"""Latent-variable models: the convolutional autoencoder and the variational autoencoder.

[1]: Kingma & Welling 2014, Auto-Encoding Variational Bayes, https://arxiv.org/abs/1312.6114
     (the Gaussian encoder, the reparameterization trick, the closed-form KL to N(0, I)).
[2]: Burda et al. 2016, Importance Weighted Autoencoders, https://arxiv.org/abs/1509.00519
     (the k-sample importance-weighted NLL estimate, computed once for training and gen-eval in
     train/scores.py from this model's encode and decode).

Both share one encoder (stride-2 convolutions down to a small map, then a linear layer) and one decoder
(a linear layer, then nearest upsampling + convolutions back to the image size), sized from the image shape,
so any data set's images fit. The VAE's decoder ends in one of the shared likelihood heads (Bernoulli,
K-level categorical, discretized Gaussian, logistic mixture) and so returns the same (B, C, H, W, K)
log-probability table as the autoregressive models. The autoencoder reconstructs normalized intensities
with the L2 loss, and keeps running statistics of its codes so that it can also be sampled from (a
Gaussian fitted to the training codes: a plain autoencoder has no prior of its own).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConfigError, GenerativeModel, ImageConfig, check_likelihood
from .graphs import GraphDef, latent_graphs
from .heads import make_head


@dataclass
class LatentConfig(ImageConfig):
    latent_size: int = 16
    hidden: int = 32  # channels of the first stage; doubled at each further stage
    depth: int = 2  # stride-2 stages

    def validate(self) -> None:
        super().validate()
        if self.latent_size < 1 or self.hidden < 1 or self.depth < 0:
            raise ConfigError(f"need latent_size >= 1, hidden >= 1, depth >= 0; got {self.latent_size}, "
                              f"{self.hidden}, {self.depth}")


@dataclass
class AutoencoderConfig(LatentConfig):
    stats_momentum: float = 0.01  # running mean/std of the codes, for sampling


@dataclass
class VAEConfig(LatentConfig):
    likelihood: str = "bernoulli"
    n_mix: int = 5

    def validate(self) -> None:
        super().validate()
        check_likelihood(self.likelihood, self.levels)


def stage_sizes(height: int, width: int, depth: int) -> list[tuple[int, int]]:
    """Spatial size after each stride-2 stage (ceil division), starting with the image's."""
    sizes = [(height, width)]
    for _ in range(depth):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class Encoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> features (B, F)."""

    def __init__(self, c: LatentConfig) -> None:
        super().__init__()
        chans = [c.channels] + [c.hidden * 2**i for i in range(c.depth)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in itertools.pairwise(chans))
        h, w = stage_sizes(c.height, c.width, c.depth)[-1]
        self.out_features = chans[-1] * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.silu(conv(x))
        return x.flatten(1)


class Decoder(nn.Module):
    """z (B, Z) -> (B, out_channels, H, W)."""

    def __init__(self, c: LatentConfig, in_features: int, out_channels: int) -> None:
        super().__init__()
        self.sizes = stage_sizes(c.height, c.width, c.depth)
        chans = [c.channels] + [c.hidden * 2**i for i in range(c.depth)]
        top = chans[-1]
        h, w = self.sizes[-1]
        self.top_shape = (top, h, w)
        self.fc = nn.Linear(in_features, top * h * w)
        # Stage i maps chans[i + 1] at sizes[i + 1] to chans[i] (or hidden at full size) at sizes[i].
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i + 1], chans[i] if i else c.hidden, 3, padding=1)
            for i in reversed(range(c.depth))
        )
        last_in = c.hidden if c.depth else top
        self.out = nn.Conv2d(last_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.fc(z)).reshape(z.shape[0], *self.top_shape)
        for conv, size in zip(self.convs, reversed(self.sizes[:-1]), strict=True):
            y = F.silu(conv(F.interpolate(y, size=size, mode="nearest")))
        return self.out(y)


class LatentModel(GenerativeModel):
    family: ClassVar[str] = "latent"
    variational: ClassVar[bool] = False  # a VAE: encode gives (mean, logvar), decode level log-probabilities
    config: LatentConfig

    def export_graphs(self) -> list[GraphDef]:
        return latent_graphs(self)

    def with_labels(self, v: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        oh = self.one_hot(labels, v)
        return v if oh is None else torch.cat([v, oh], dim=1)

    def check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():
            return
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.channels, c.height, c.width):
            raise ValueError(f"expected images of shape (B, {c.channels}, {c.height}, {c.width}), got {tuple(x.shape)}")


class Autoencoder(LatentModel):
    """Deterministic code z = enc(x); reconstruction dec(z) in [-1, 1]; L2 loss."""

    config: AutoencoderConfig

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = Encoder(c)
        self.enc_out = nn.Linear(self.encoder.out_features + c.num_classes, c.latent_size)
        self.decoder = Decoder(c, c.latent_size + c.num_classes, c.channels)
        self.register_buffer("latent_mean", torch.zeros(c.latent_size))
        self.register_buffer("latent_std", torch.ones(c.latent_size))

    def latent_prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and std of the codes seen in training: an autoencoder's codes are not N(0, I)."""
        return self.latent_mean, self.latent_std

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        return self.enc_out(self.with_labels(self.encoder(self.normalize(x)), labels))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, Z) -> reconstruction (B, C, H, W) in [-1, 1]."""
        return torch.tanh(self.decoder(self.with_labels(z, labels)))

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Squared error per image, summed over sub-pixels, in normalized units: (B,)."""
        z = self.encode(x, labels)
        if self.training:
            with torch.no_grad():  # a Gaussian fitted to the codes, to sample from
                m = self.config.stats_momentum
                self.latent_mean.lerp_(z.mean(0), m)
                self.latent_std.lerp_(z.std(0, unbiased=False) if len(z) > 1 else self.latent_std, m)
        return (self.decode(z, labels) - self.normalize(x)).pow(2).flatten(1).sum(1)


class VAE(LatentModel):
    """q(z|x) = N(mu, diag(exp(logvar))), p(z) = N(0, I), p(x|z) one of the shared likelihood heads."""

    variational: ClassVar[bool] = True
    config: VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        c = config
        self.head = make_head(c.likelihood, c.levels, c.n_mix)
        self.encoder = Encoder(c)
        self.enc_out = nn.Linear(self.encoder.out_features + c.num_classes, 2 * c.latent_size)
        self.decoder = Decoder(c, c.latent_size + c.num_classes, self.head.params_per_channel * c.channels)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance), each (B, Z)."""
        self.check_input(x)
        mu, logvar = self.enc_out(self.with_labels(self.encoder(self.normalize(x)), labels)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, Z) -> log p(x | z) per level: (B, C, H, W, K)."""
        raw = self.decoder(self.with_labels(z, labels))  # (B, P * C, H, W)
        b, _, h, w = raw.shape
        return self.head.log_probs(raw.reshape(b, self.head.params_per_channel, self.config.channels, h, w))

    def log_px(self, x: torch.Tensor, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """log p(x | z) in nats per image: (B,)."""
        lp = self.decode(z, labels)
        return lp.gather(-1, x.long().unsqueeze(-1)).flatten(1).sum(1)

    def iwae_bound(self, x: torch.Tensor, k: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The k-sample importance-weighted lower bound on log p(x) (Burda et al. 2016, eq. 8), one reparameterized
        draw of k latents per image: log (1/k) sum_i p(x, z_i) / q(z_i | x), (B,). k = 1 is an ELBO estimate
        with a sampled KL; larger k tightens the bound and trains the IWAE."""
        mu, logvar = self.encode(x, labels)  # (B, Z)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)  # (k, B, Z)
        z = mu + std * eps
        log_q = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(-1)  # (k, B)
        log_prior = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        rep = (lambda t: t.repeat(k, *([1] * (t.dim() - 1)))) if labels is not None else None
        log_px = self.log_px(x.repeat(k, 1, 1, 1), z.reshape(-1, z.shape[-1]),
                             None if rep is None else rep(labels)).reshape(k, -1)
        return torch.logsumexp(log_px + log_prior - log_q, dim=0) - math.log(k)

    def elbo_terms(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_q log p(x|z) with one reparameterized sample, KL(q || p) in closed form), each (B,)."""
        mu, logvar = self.encode(x, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return self.log_px(x, z, labels), kl
