"""Sample quality that works offline: Fréchet and kernel distances between generated and held-out images,
in the feature space of a small classifier trained on the same data set.

[1]: Heusel et al. 2017, GANs Trained by a Two Time-Scale Update Rule (the Fréchet distance, FID),
     https://arxiv.org/abs/1706.08500
[2]: Bińkowski et al. 2018, Demystifying MMD GANs (the kernel distance, KID: unbiased MMD^2 with the
     cubic polynomial kernel), https://arxiv.org/abs/1801.01401

The features come from ``FeatureNet``, trained here on the data set's class labels, or, for data without
labels, on predicting which of four rotations (or flips, for non-square images) was applied. These numbers
are comparable between models evaluated with the same feature network, and NOT comparable to published,
Inception-based FID/KID figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genforge.runtime.files import atomic_write_bytes, atomic_write_json

from .checkpoint import read_json
from .data import ImageData


class FeatureNet(nn.Module):
    """Two stride-2 convolutions, global average pooling: a 64-d feature per image."""

    def __init__(self, channels: int, n_out: int, width: int = 64) -> None:
        super().__init__()
        self.channels, self.n_out, self.width = channels, n_out, width
        self.conv1 = nn.Conv2d(channels, width // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, n_out)

    def prepare(self, images: np.ndarray, levels: int) -> torch.Tensor:
        return _to_input(images, levels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> (B, width)."""
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y))
        y = F.relu(self.conv3(y))
        return y.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _to_input(images: np.ndarray, levels: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
    return x * (2.0 / (levels - 1)) - 1.0


def _transform(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The self-supervised task for unlabelled data: rotate by k * 90 degrees (square) or flip."""
    out = torch.empty_like(x)
    square = x.shape[2] == x.shape[3]
    for t in range(4):
        sel = k == t
        if square:
            out[sel] = torch.rot90(x[sel], t, dims=(2, 3))
        else:
            dims = [d for d, bit in ((3, t & 1), (2, t & 2)) if bit]
            out[sel] = torch.flip(x[sel], dims) if dims else x[sel]
    return out


@torch.enable_grad()  # callers evaluate under no_grad
def train_feature_net(
    data: ImageData, *, epochs: int = 3, batch_size: int = 128, limit: int = 10000, seed: int = 0
) -> FeatureNet:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = min(len(data), limit)
    x_all = _to_input(data.images[:n], data.levels)
    labelled = data.labels is not None and data.num_classes > 1
    net = FeatureNet(x_all.shape[1], data.num_classes if labelled else 4)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for a in range(0, n, batch_size):
            idx = perm[a : a + batch_size]
            x = x_all[idx]
            if labelled:
                y = torch.from_numpy(data.labels[:n][idx.numpy()]).long()
            else:
                y = torch.randint(0, 4, (len(idx),), generator=g)
                x = _transform(x, y)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def save_feature_net(net: FeatureNet, directory: str | Path) -> None:
    from safetensors.torch import save

    directory = Path(directory)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(directory / "features.safetensors", save(state))
    atomic_write_json(directory / "features.json", {"channels": net.channels, "n_out": net.n_out, "width": net.width})


def load_feature_net(directory: str | Path) -> FeatureNet:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_json(directory / "features.json", "feature network config")
    net = FeatureNet(int(meta["channels"]), int(meta["n_out"]), int(meta["width"]))
    net.load_state_dict(load_file(str(directory / "features.safetensors")))
    return net.eval()


@torch.no_grad()
def extract(net: nn.Module, images: np.ndarray, levels: int, batch_size: int = 64) -> np.ndarray:
    """uint8 levels (N, H, W, C) -> float64 features (N, D), by any network with ``prepare`` and
    ``features`` (FeatureNet, or the Inception-v3 of inception.py)."""
    out = [net.features(net.prepare(images[a : a + batch_size], levels)).double().numpy()
           for a in range(0, len(images), batch_size)]
    return np.concatenate(out)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two feature sets."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    # Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), the form with a symmetric PSD argument.
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * cross)


def kernel_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x . y / d + 1)^3."""
    d = f1.shape[1]
    kxx = (f1 @ f1.T / d + 1) ** 3
    kyy = (f2 @ f2.T / d + 1) ** 3
    kxy = (f1 @ f2.T / d + 1) ** 3
    m, n = len(f1), len(f2)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@dataclass
class QualityReport:
    fd: float
    kd: float
    n_generated: int
    n_reference: int

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}fd": self.fd, f"{prefix}kd": self.kd}


def sample_quality(net: nn.Module, generated: np.ndarray, reference: np.ndarray, levels: int) -> QualityReport:
    if len(generated) < 2 or len(reference) < 2:
        raise ValueError("the distances need at least two generated and two reference images")
    a, b = extract(net, generated, levels), extract(net, reference, levels)
    return QualityReport(frechet_distance(a, b), kernel_distance(a, b), len(generated), len(reference))
