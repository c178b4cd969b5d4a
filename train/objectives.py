"""Objectives: what the trainer minimizes, how a held-out split is scored, and how to draw a sample grid.

The trainer only calls these three methods, so it never looks inside a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import nn

from genforge.models import AutoregressiveModel
from genforge.models.incremental import EagerStepper, incremental
from genforge.runtime.decoding import cached_decode, naive_decode
from genforge.runtime.randomness import uniforms


class Objective(Protocol):
    def loss(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x: (B, C, H, W) int64 levels. Returns the scalar to minimize and per-batch metrics."""
        ...

    def evaluate(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """Sums over the batch of per-image scores; the trainer divides by the number of images."""
        ...

    def summarize(self, totals: dict[str, float], n_images: int) -> dict[str, float]:
        ...

    def sample(self, model: nn.Module, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        """uint8 (n, H, W, C)."""
        ...


class AutoregressiveObjective:
    """Exact negative log-likelihood in nats per image; bits per dimension for reporting."""

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def loss(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        nll = model.nll(x, labels)  # (B,)
        loss = nll.mean()
        return loss, {"nats_per_image": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        return {"nll": float(model.nll(x, labels).double().sum())}

    def summarize(self, totals: dict[str, float], n_images: int) -> dict[str, float]:
        nats = totals["nll"] / n_images
        return {"nats_per_image": nats, "bits_per_dim": nats / (self.dims * math.log(2.0))}

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        """The runtime's cached decoding loop over the model's incremental form (the naive loop for models
        without one), with the runtime's randomness: the grid shows what the exported bundle will draw."""
        assert isinstance(model, AutoregressiveModel)
        c = model.config
        u = uniforms(seed, 0, n, (c.height, c.width, c.channels))
        try:
            stepper = EagerStepper(incremental(model), next(model.parameters()).dtype)
        except TypeError:
            return naive_decode(self._forward(model), u, labels=labels, levels=c.levels)
        return cached_decode(stepper, u, labels=labels, levels=c.levels)

    @staticmethod
    def _forward(model: AutoregressiveModel) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype

        def forward(x: np.ndarray, lab: np.ndarray | None) -> np.ndarray:
            t_lab = None if lab is None else torch.from_numpy(lab).to(device)
            return model(torch.from_numpy(x).to(device, dtype), t_lab).cpu().numpy()

        return forward


def objective_for(model: nn.Module) -> Objective:
    if isinstance(model, AutoregressiveModel):
        c = model.config
        return AutoregressiveObjective(c.channels * c.height * c.width)
    raise TypeError(f"no training objective for {type(model).__name__}")
