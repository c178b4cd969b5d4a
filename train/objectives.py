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

from genforge.models import VAE, AutoregressiveModel, LatentModel
from genforge.models.incremental import EagerStepper, incremental
from genforge.runtime.decoding import cached_decode, naive_decode
from genforge.runtime.latent import levels_from_log_probs, levels_from_mean
from genforge.runtime.randomness import normals, uniforms


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


class LatentObjective:
    """VAE: the negative ELBO, reported as its two terms, with an optional linear KL warm-up; on held-out
    data also the k-sample importance-weighted NLL estimate. Autoencoder: the L2 reconstruction loss."""

    def __init__(self, model: LatentModel, kl_warmup_steps: int = 0, iw_samples: int = 8) -> None:
        self.is_vae = isinstance(model, VAE)
        self.kl_warmup_steps = kl_warmup_steps
        self.iw_samples = iw_samples
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = step

    @property
    def beta(self) -> float:
        return min(1.0, (self.step + 1) / self.kl_warmup_steps) if self.kl_warmup_steps else 1.0

    def loss(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.is_vae:
            l2 = model.loss(x, labels).mean()
            return l2, {"l2": float(l2.detach())}
        rec, kl = model.elbo_terms(x, labels)
        loss = (-rec + self.beta * kl).mean()
        return loss, {"reconstruction_nats": float(-rec.detach().mean()), "kl_nats": float(kl.detach().mean()),
                      "neg_elbo": float((kl - rec).detach().mean()), "beta": self.beta}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        if not self.is_vae:
            return {"l2": float(model.loss(x, labels).double().sum())}
        rec, kl = model.elbo_terms(x, labels)
        out = {"rec": float(-rec.double().sum()), "kl": float(kl.double().sum())}
        if self.iw_samples:
            out["iwae"] = float(-model.iwae_log_likelihood(x, labels, self.iw_samples).double().sum())
        return out

    def summarize(self, totals: dict[str, float], n_images: int) -> dict[str, float]:
        if not self.is_vae:
            return {"l2_per_image": totals["l2"] / n_images}
        out = {"neg_elbo": (totals["rec"] + totals["kl"]) / n_images, "reconstruction_nats": totals["rec"] / n_images,
               "kl_nats": totals["kl"] / n_images}
        if "iwae" in totals:
            out[f"iwae_nll_k{self.iw_samples}"] = totals["iwae"] / n_images
        return out

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        """Decoded latents drawn with the runtime's randomness (the expected level of each sub-pixel)."""
        c = model.config
        p = next(model.parameters())
        eps = torch.from_numpy(normals(seed, 0, n, c.latent_size)).to(p)
        lab = None if labels is None else torch.from_numpy(labels).to(p.device)
        if self.is_vae:
            return levels_from_log_probs(model.decode(eps, lab).double().cpu().numpy())
        z = model.latent_mean + model.latent_std * eps
        return levels_from_mean(model.decode(z, lab).double().cpu().numpy(), c.levels)


def objective_for(model: nn.Module, kl_warmup_steps: int = 0, iw_samples: int = 8) -> Objective:
    if isinstance(model, AutoregressiveModel):
        c = model.config
        return AutoregressiveObjective(c.channels * c.height * c.width)
    if isinstance(model, LatentModel):
        return LatentObjective(model, kl_warmup_steps, iw_samples)
    raise TypeError(f"no training objective for {type(model).__name__}")
