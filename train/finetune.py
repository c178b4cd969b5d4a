"""The encoder as a feature extractor: a classifier head on a trained autoencoder/VAE encoder, fine-tuned
on labelled data (the classic use of unsupervised pre-training).

    clf, report = finetune_classifier("runs/vae-digits-1", DataSpec("digits"), epochs=5)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genforge.models import LatentModel

from .checkpoint import load_run
from .data import DataError, ImageData
from .run import DataSpec, UsageError


class EncoderClassifier(nn.Module):
    """The latent model's encoder (up to the code's mean) followed by an MLP head."""

    def __init__(self, model: LatentModel, num_classes: int, hidden: int = 64, freeze_encoder: bool = False) -> None:
        super().__init__()
        if model.config.num_classes:
            raise UsageError("a class-conditional encoder reads the label it should predict: use an unconditional run")
        self.model = model
        self.latent_size = model.config.latent_size
        self.head = nn.Sequential(nn.Linear(self.latent_size, hidden), nn.SiLU(), nn.Linear(hidden, num_classes))
        if freeze_encoder:
            for p in model.parameters():
                p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        code = self.model.encode(x)
        return code[0] if self.model.variational else code  # the VAE's posterior mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class FinetuneReport:
    initial_accuracy: float  # held-out accuracy before any step (head at its initialization)
    accuracy: float  # held-out accuracy after fine-tuning
    losses: list[float]  # training loss per epoch


def _tensors(data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    if data.labels is None:
        raise DataError("fine-tuning a classifier needs a labelled data set")
    x = torch.from_numpy(np.ascontiguousarray(data.images.transpose(0, 3, 1, 2))).long()
    return x, torch.from_numpy(data.labels).long()


@torch.no_grad()
def accuracy(clf: nn.Module, data: ImageData, batch_size: int = 256) -> float:
    clf.eval()
    x, y = _tensors(data)
    correct = sum(int((clf(x[a : a + batch_size]).argmax(1) == y[a : a + batch_size]).sum())
                  for a in range(0, len(x), batch_size))
    clf.train()
    return correct / len(x)


def finetune_classifier(
    run_dir: str | Path,
    data: DataSpec,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    freeze_encoder: bool = False,
    train_limit: int = 0,
    seed: int = 0,
) -> tuple[EncoderClassifier, FinetuneReport]:
    """Initialize a classifier with the run's trained encoder and fine-tune it on ``data``'s labels."""
    model, run = load_run(run_dir)
    if model.family != "latent":
        raise UsageError(f"{run_dir}: fine-tuning needs an autoencoder or VAE run, got {run.model!r}")
    torch.manual_seed(seed)
    train = data.load(data.split, seed)
    valid = data.load(data.eval_split or "valid", seed)
    if train.levels != model.config.levels:
        raise UsageError(f"the data has {train.levels} levels, the encoder was trained on {model.config.levels}")
    if train_limit:
        train = train.subset(np.arange(min(train_limit, len(train))))
    if not train.num_classes:
        raise DataError(f"data set {data.name!r} has no class labels to fine-tune on")
    clf = EncoderClassifier(model, train.num_classes, freeze_encoder=freeze_encoder)
    initial = accuracy(clf, valid)
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=lr)
    x, y = _tensors(train)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for a in range(0, len(x), batch_size):
            idx = perm[a : a + batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    return clf, FinetuneReport(initial, accuracy(clf, valid), losses)
