"""DCGAN generator and discriminator, sized from the image shape (8x8 up to 64x64, 1 or 3 channels), with
optional class conditioning.

[1]: Goodfellow et al. 2014, Generative Adversarial Nets, https://arxiv.org/abs/1406.2661
[2]: Radford et al. 2016, Unsupervised Representation Learning with Deep Convolutional GANs,
     https://arxiv.org/abs/1511.06434 (strided (transposed) convolutions, batch norm, ReLU in G and
     LeakyReLU(0.2) in D, tanh output).

The generator projects z to a small map (the image size halved ``stages`` times) and doubles it per
stage with 4x4 stride-2 transposed convolutions; the discriminator mirrors it with 4x4 stride-2
convolutions. Conditioning: the one-hot label is appended to z, and to D's input as constant planes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConfigError, GenerativeModel, ImageConfig
from .graphs import GraphDef, gan_graphs


@dataclass
class GANConfig(ImageConfig):
    latent_size: int = 64
    hidden: int = 64  # feature maps at the full-resolution stage; doubled per stage towards the bottom

    def validate(self) -> None:
        super().validate()
        if self.latent_size < 1 or self.hidden < 1:
            raise ConfigError(f"need latent_size >= 1 and hidden >= 1, got {self.latent_size}, {self.hidden}")
        if not (8 <= self.height <= 64 and 8 <= self.width <= 64):
            raise ConfigError(f"the DCGAN is sized for images from 8x8 to 64x64, got {self.height}x{self.width}")


def gan_stages(height: int, width: int) -> int:
    """Stride-2 stages: halve while both sides stay even and the map stays at least 4 pixels."""
    n = 0
    while height % 2 ** (n + 1) == 0 and width % 2 ** (n + 1) == 0 and min(height, width) // 2 ** (n + 1) >= 4:
        n += 1
    return n


class Generator(nn.Module):
    def __init__(self, c: GANConfig) -> None:
        super().__init__()
        n = gan_stages(c.height, c.width)
        self.start = (c.height // 2**n, c.width // 2**n)
        chans = [c.hidden * 2 ** (n - i) for i in range(n + 1)]  # bottom -> top
        self.start_channels = chans[0]
        self.project = nn.Linear(c.latent_size + c.num_classes, chans[0] * self.start[0] * self.start[1])
        self.project_bn = nn.BatchNorm2d(chans[0])
        self.ups = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=False)
                                 for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in chans[1:])
        self.out = nn.Conv2d(chans[-1], c.channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.project(z).reshape(z.shape[0], self.start_channels, *self.start)
        y = F.relu(self.project_bn(y))
        for up, bn in zip(self.ups, self.bns, strict=True):
            y = F.relu(bn(up(y)))
        return torch.tanh(self.out(y))  # (B, C, H, W) in [-1, 1]


class Discriminator(nn.Module):
    def __init__(self, c: GANConfig) -> None:
        super().__init__()
        n = max(1, gan_stages(c.height, c.width))
        chans = [c.channels + c.num_classes] + [c.hidden * 2**i for i in range(n)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1, bias=i == 0)
                                   for i, (a, b) in enumerate(zip(chans[:-1], chans[1:], strict=True)))
        # No batch norm on the first layer [2]: it sees the raw images.
        self.bns = nn.ModuleList([nn.Identity()] + [nn.BatchNorm2d(b) for b in chans[2:]])
        h, w = c.height, c.width
        for _ in range(n):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.out = nn.Linear(chans[-1] * h * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = F.leaky_relu(bn(conv(x)), 0.2)
        return self.out(x.flatten(1))[:, 0]  # (B,) logits of "real"


class GAN(GenerativeModel):
    family: ClassVar[str] = "gan"
    config: GANConfig

    def export_graphs(self) -> list[GraphDef]:
        return gan_graphs(self)

    def __init__(self, config: GANConfig) -> None:
        super().__init__(config)
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, Z) -> images in [-1, 1], (B, C, H, W)."""
        oh = self.one_hot(labels, z)
        return self.generator(z if oh is None else torch.cat([z, oh], dim=1))

    def discriminate(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> logits of real (B,)."""
        oh = self.one_hot(labels, x)
        if oh is not None:
            x = torch.cat([x, oh[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return self.discriminator(x)
