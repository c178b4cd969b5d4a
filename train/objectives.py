"""Objectives: what the trainer minimizes, how a held-out split is scored, and how to draw a sample grid.

The trainer calls only the methods of the Objective base class (its default train step is one batch
through ``loss``), so it never looks inside a model; ``objective_for`` picks a family's objective by the
model's ``family`` string.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genforge.models import AutoregressiveModel, LatentModel
from genforge.models.incremental import EagerStepper
from genforge.runtime.decoding import cached_decode, naive_decode
from genforge.runtime.latent import levels_from_log_probs, levels_from_mean
from genforge.runtime.randomness import normals, uniforms

from . import scores
from .data import ImageData
from .errors import TrainingError, UsageError


class Objective:
    """What a family's training minimizes, how a held-out split is scored and how a sample grid is drawn.

    The trainer knows a model only through this class. A family overrides ``loss``, ``evaluate`` and
    ``summarize`` (or ``evaluate_all``) and ``sample``; the default ``train_step`` is one batch through
    ``loss`` with the trainer's optimizer, and a family that trains otherwise (the GAN's two players)
    overrides ``make_optimizer`` and ``train_step`` and keeps its state in ``state_dict``.
    """

    batches_per_step: int = 1  # training batches one step consumes (the GAN's k discriminator batches)
    # The held-out metric (lower is better) by which a run keeps its best weights and stops early; a
    # metric missing from an evaluation keeps nothing.
    selection_metric: str = "nats_per_image"
    supports_ddp: bool = True  # the default step runs under DistributedDataParallel; a custom one may not

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        """The optimizer the default train step uses (AdamW); None for an objective that owns its own."""
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def loss(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x: (B, C, H, W) int64 levels. Returns the scalar to minimize and per-batch metrics."""
        raise NotImplementedError

    def train_step(self, trainer: Any, step: int, lr: float) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step at ``lr``: ``trainer.optimization_step`` runs ``loss`` on the step's batch
        (through DDP and autocast where the trainer has them), clips and steps the optimizer."""
        return trainer.optimization_step(step, lr)

    def set_step(self, step: int) -> None:
        """Called before each step (schedules inside the objective, e.g. the VAE's KL warm-up)."""

    def evaluate(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, first: int = 0
                 ) -> dict[str, float]:
        """Sums over the batch of per-image scores; the trainer divides by the number of images. ``first``:
        the split index of the batch's first image (for noise drawn per image)."""
        raise NotImplementedError

    def summarize(self, totals: dict[str, float], n_images: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate_all(self, model: nn.Module, data: ImageData, limit: int = 0) -> dict[str, float] | None:
        """Metrics over a whole split at once (sample quality), or None to score it batch by batch."""
        return None

    def sample(self, model: nn.Module, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        """uint8 (n, H, W, C)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, object]:
        """What exact resume needs beyond the model, the trainer's optimizer and the RNG."""
        return {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        pass


class AutoregressiveObjective(Objective):
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
    def evaluate(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, first: int = 0
                 ) -> dict[str, float]:
        return {"nll": float(model.nll(x, labels).double().sum())}

    def summarize(self, totals: dict[str, float], n_images: int) -> dict[str, float]:
        return scores.summarize(totals, n_images, dims=self.dims, iw_samples=0)

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        """The runtime's cached decoding loop over the model's incremental form (the naive loop for models
        without one), with the runtime's randomness: the grid shows what the exported bundle will draw."""
        c = model.config
        u = uniforms(seed, 0, n, (c.height, c.width, c.channels))
        try:
            stepper = EagerStepper(model.cached_form(), next(model.parameters()).dtype)
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


class LatentObjective(Objective):
    """VAE: the negative ELBO, reported as its two terms, with an optional linear KL warm-up; on held-out
    data also the k-sample importance-weighted NLL estimate. Autoencoder: the L2 reconstruction loss."""

    eval_seed = 0  # the noise of held-out image i comes from (0, i), as in gen-eval with its default --seed

    def __init__(self, model: LatentModel, kl_warmup_steps: int = 0, iw_samples: int = 8, iw_train: int = 0) -> None:
        self.is_vae = model.variational
        self.kl_warmup_steps = kl_warmup_steps
        self.iw_samples = iw_samples
        if iw_train < 0:
            raise UsageError(f"--iw-train must be >= 0, got {iw_train}")
        if iw_train and kl_warmup_steps:
            raise UsageError("--iw-train and --kl-warmup-steps exclude each other: the warm-up weights the ELBO's KL "
                             "term, which the importance-weighted bound does not have")
        if iw_train and not self.is_vae:
            raise UsageError("--iw-train trains a VAE's importance-weighted bound; the autoencoder has none")
        self.iw_train = iw_train
        self.step = 0
        # The tightest bound the evaluation computes: the importance-weighted NLL where it has samples.
        self.selection_metric = ("iwae_nll" if iw_samples else "neg_elbo") if self.is_vae else "l2_per_image"

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
        if self.iw_train:  # the IWAE: the k-sample bound itself is maximized
            bound = model.iwae_bound(x, self.iw_train, labels)
            loss = -bound.mean()
            return loss, {"iwae_train_nats": float(loss.detach()), "iw_train": float(self.iw_train)}
        rec, kl = model.elbo_terms(x, labels)
        loss = (-rec + self.beta * kl).mean()
        return loss, {"reconstruction_nats": float(-rec.detach().mean()), "kl_nats": float(kl.detach().mean()),
                      "neg_elbo": float((kl - rec).detach().mean()), "beta": self.beta}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, first: int = 0
                 ) -> dict[str, float]:
        """The sums of train/scores.py, gen-eval's own computation: with the same seed (0, gen-eval's default)
        the epoch's held-out numbers are exactly what ``gen-eval RUN --split valid`` reports."""
        encode, decode = eager_latent_functions(model)
        totals: dict[str, float] = {}
        y = None if labels is None else labels.cpu().numpy()
        scores.latent_totals(encode, decode, x.cpu().numpy(), y, variational=self.is_vae, levels=model.config.levels,
                             first=first, seed=self.eval_seed, iw_samples=self.iw_samples, totals=totals)
        return totals

    def summarize(self, totals: dict[str, float], n_images: int) -> dict[str, float]:
        return scores.summarize(totals, n_images, dims=0, iw_samples=self.iw_samples)

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        """Decoded latents drawn with the runtime's randomness (the expected level of each sub-pixel)."""
        c = model.config
        p = next(model.parameters())
        eps = torch.from_numpy(normals(seed, 0, n, c.latent_size)).to(p)
        lab = None if labels is None else torch.from_numpy(labels).to(p.device)
        if self.is_vae:
            return levels_from_log_probs(model.decode(eps, lab).double().cpu().numpy())
        mean, std = model.latent_prior()
        z = mean + std * eps
        return levels_from_mean(model.decode(z, lab).double().cpu().numpy(), c.levels)


def eager_latent_functions(model: nn.Module) -> tuple[scores.Encode, scores.Decode]:
    """A latent model's encode and decode as the numpy functions train/scores.py takes (on the model's device
    and dtype; an autoencoder's log-variance is zero, its code being exact)."""
    p = next(model.parameters())

    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(p.device)

    @torch.no_grad()
    def encode(x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        out = model.encode(t(x), t(y))
        mean, logvar = out if model.variational else (out, torch.zeros_like(out))
        return mean.float().cpu().numpy(), logvar.float().cpu().numpy()

    @torch.no_grad()
    def decode(z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        return model.decode(t(z.astype(np.float32)).to(p.dtype), t(y)).float().cpu().numpy()

    return encode, decode


GAN_LOSSES = ("non-saturating", "minimax")


def dequantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels (int) -> continuous values in [0, levels - 1], as an 8-bit image's are: each level spread uniformly
    over one 8-bit step, (levels - 1) / 255 level units wide (a whole level at 256 levels). Real images are
    discrete and fakes continuous, and without noise D can tell them apart by that alone; but noise as wide as a
    level is a quarter of the range for binary images, which D told from the generator's output by its texture,
    while the generator learned to put strokes at the rounding edge (speckled binary samples). The end levels'
    noise is folded back inside [0, levels - 1], the generator's tanh range, and every value rounds back to its
    level (the GAN sampling rule rounds)."""
    width = min(1.0, (levels - 1) / 255.0)
    v = x.float() + (torch.rand(x.shape, device=x.device) - 0.5) * width
    top = float(levels - 1)
    return torch.where(v < 0, -v, torch.where(v > top, 2 * top - v, v))


def generator_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's loss from D's logits on generated images.

    non-saturating: -log D(G(z)); minimax: log(1 - D(G(z))) = -softplus(logit).
    """
    if kind == "non-saturating":
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    if kind == "minimax":
        return -F.softplus(logits).mean()
    raise ValueError(f"unknown generator loss {kind!r}; choose one of {', '.join(GAN_LOSSES)}")


class GANObjective(Objective):
    """Algorithm 1 of Goodfellow et al. 2014: k discriminator steps (each on a fresh real batch) per
    generator step, Adam with the customary betas (0.5, 0.999).

    Generator losses: ``non-saturating`` (default) maximizes log D(G(z)); ``minimax`` minimizes
    log(1 - D(G(z))), whose gradient vanishes exactly when D confidently rejects the samples, early in
    training. A NaN loss, or generated batches that stop varying (mode collapse), stop the run with a
    TrainingError; the trainer's last checkpoint stays as it was.
    """

    def __init__(self, model: nn.Module, *, k: int = 1, loss: str = "non-saturating", lr: float = 2e-4,
                 train_data: ImageData | None = None, eval_samples: int = 500) -> None:
        if loss not in GAN_LOSSES:
            raise ValueError(f"unknown generator loss {loss!r}; choose one of {', '.join(GAN_LOSSES)}")
        if k < 1:
            raise ValueError(f"k (discriminator steps per generator step) must be >= 1, got {k}")
        self.batches_per_step = k
        self.loss_kind = loss
        betas = (0.5, 0.999)
        self.opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=betas)
        self.opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas)
        self.train_data = train_data
        self.eval_samples = eval_samples
        self.feature_net: object = None
        self.flat_steps = 0

    supports_ddp = False
    selection_metric = "fd"  # the Fréchet distance of fixed-seed samples to the held-out images

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
        return None  # the two players' Adam optimizers are this objective's own

    def state_dict(self) -> dict[str, object]:
        return {"opt_d": self.opt_d.state_dict(), "opt_g": self.opt_g.state_dict(), "flat_steps": self.flat_steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.opt_d.load_state_dict(state["opt_d"])  # type: ignore[arg-type]
        self.opt_g.load_state_dict(state["opt_g"])  # type: ignore[arg-type]
        self.flat_steps = int(state["flat_steps"])  # type: ignore[call-overload]

    def train_step(self, trainer: Any, step: int, lr: float) -> tuple[torch.Tensor, dict[str, float]]:
        batches = [trainer.batch(step * self.batches_per_step + i) for i in range(self.batches_per_step)]
        metrics = self.players_step(trainer.model, batches, step, lr)
        return torch.tensor(metrics.pop("loss")), metrics

    def players_step(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]], step: int,
                     lr: float) -> dict[str, float]:
        """Algorithm 1's inner loop: k discriminator updates, then one generator update."""
        for opt in (self.opt_d, self.opt_g):
            for group in opt.param_groups:
                group["lr"] = lr
        zsize = model.config.latent_size
        for x, y in batches:
            real = model.normalize(dequantize(x, model.config.levels))
            fake = model.generate(torch.randn(len(x), zsize, device=x.device), y).detach()
            d_real, d_fake = model.discriminate(real, y), model.discriminate(fake, y)
            d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        fake = model.generate(torch.randn(len(x), zsize, device=x.device), y)
        logits = model.discriminate(fake, y)
        g_loss = generator_loss(logits, self.loss_kind)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        metrics = {"loss": float(g_loss.detach()), "d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach()),
                   "d_real": float(torch.sigmoid(d_real.detach()).mean()),
                   "d_fake": float(torch.sigmoid(d_fake.detach()).mean())}
        if not all(math.isfinite(v) for v in metrics.values()):
            raise TrainingError(f"the GAN losses became non-finite at step {step} ({metrics}) (lower --lr)")
        spread = float(fake.detach().std(0).mean()) if len(fake) > 1 else 1.0
        self.flat_steps = self.flat_steps + 1 if spread < 1e-3 else 0
        if self.flat_steps >= 50:
            raise TrainingError(f"mode collapse at step {step}: generated images have not varied for 50 steps "
                                f"(spread {spread:.2g})")
        return metrics

    def loss(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError("GAN training runs through train_step")

    def evaluate(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, first: int = 0
                 ) -> dict[str, float]:
        raise NotImplementedError("GAN evaluation runs through evaluate_all")

    def summarize(self, totals: dict[str, float], n_images: int) -> dict[str, float]:
        return totals

    @torch.no_grad()
    def evaluate_all(self, model: nn.Module, data: ImageData, limit: int = 0) -> dict[str, float]:
        """The sample-quality distances between fixed-seed samples and the held-out images."""
        from .quality import sample_quality, train_feature_net

        if self.feature_net is None:
            self.feature_net = train_feature_net(self.train_data if self.train_data is not None else data)
        n = min(len(data), limit or self.eval_samples, self.eval_samples)
        classes = model.config.num_classes
        labels = data.labels[:n] if classes and data.labels is not None else None
        generated = self.sample(model, n, 12345, labels)
        return sample_quality(self.feature_net, generated, data.images[:n], data.levels).to_dict()  # type: ignore[arg-type]

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
        """The generator's images for latents drawn with the runtime's randomness (fixed noise per seed)."""
        was_training = model.training
        model.eval()
        p = next(model.parameters())
        z = torch.from_numpy(normals(seed, 0, n, model.config.latent_size)).to(p)
        lab = None if labels is None else torch.from_numpy(labels).to(p.device)
        out = levels_from_mean(model.generate(z, lab).double().cpu().numpy(), model.config.levels)
        model.train(was_training)
        return out


# Each family's own training options and their defaults: gen-train's flags of the same names, recorded in
# the run's config.json under "objective" (only the family's).
OBJECTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "autoregressive": {},
    "latent": {"kl_warmup_steps": 0,  # the KL weight rises linearly from 0 to 1 over these steps
               "iw_samples": 8,  # importance samples of the held-out NLL estimate each epoch (0: none)
               "iw_train": 0},  # importance samples of the training bound (0: the ELBO; k > 1: the IWAE)
    "gan": {"gan_k": 1,  # discriminator steps (each on a fresh batch) per generator step
            "gan_loss": "non-saturating"},  # the generator's loss: non-saturating | minimax
}


def objective_options(family: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The family's options: its defaults, updated with those of ``given`` that it has."""
    defaults = OBJECTIVE_OPTIONS.get(family, {})
    return {**defaults, **{k: v for k, v in (given or {}).items() if k in defaults}}


def objective_for(model: nn.Module, options: dict[str, Any] | None = None, *, lr: float = 2e-4,
                  train_data: ImageData | None = None) -> Objective:
    """The objective of the model's family (``model.family``), with the family's options."""
    family = model.family
    o = objective_options(family, options)
    if family == "autoregressive":
        c = model.config
        return AutoregressiveObjective(c.channels * c.height * c.width)
    if family == "latent":
        return LatentObjective(model, o["kl_warmup_steps"], o["iw_samples"], o["iw_train"])
    if family == "gan":
        return GANObjective(model, k=o["gan_k"], loss=o["gan_loss"], lr=lr, train_data=train_data)
    raise TypeError(f"no training objective for {type(model).__name__} (family {family!r})")
