"""Likelihood heads, shared by the autoregressive models and the VAE's decoder.

Each head turns the network's raw parameters for one sub-pixel into the log-probabilities of the K levels
that sub-pixel can take. The loss, the exported graphs and the runtime's inverse-CDF sampler work with that
one normalized (…, K) table; the fused Triton decoders compute the bernoulli, categorical and logistic-mixture
tables in-kernel (triton_kernels/decoders.py lists which) and are tested against these heads.

[1]: van den Oord et al. 2016, Pixel Recurrent Neural Networks (the 256-way softmax),
     https://arxiv.org/abs/1601.06759
[2]: Salimans et al. 2017, PixelCNN++: the discretized logistic mixture likelihood,
     https://arxiv.org/abs/1701.05517
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LikelihoodName = Literal["bernoulli", "categorical", "logistic-mixture", "gaussian"]
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "categorical", "logistic-mixture", "gaussian")


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), written out rather than ``F.logsigmoid``.

    The ONNX exporter turns ``F.logsigmoid`` into Log(Sigmoid(x)), and onnxruntime's Sigmoid is accurate to
    ~1e-7 in absolute terms only: where sigmoid(x) ~ 1e-4 the log then errs by ~1e-3. This form uses Exp
    and Log, which are accurate relative to their results, so exported graphs agree with eager PyTorch to
    float rounding (measured: 2.8e-4 -> 2.4e-6 on a trained gated PixelCNN, tests/test_trust.py).
    """
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-torch.abs(x)))


def log_one_minus_exp(w: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-w)) for w > 0, accurate for small w (where 1 - exp(-w) cancels) and exportable: ONNX has
    no Expm1, so below 0.1 it sums the series of 1 - exp(-w) to w^6 (relative error < w^7 / 5040 < 3e-11)."""
    series = w * (1 - w / 2 * (1 - w / 3 * (1 - w / 4 * (1 - w / 5 * (1 - w / 6)))))
    return torch.log(torch.where(w < 0.1, series, 1 - torch.exp(-w)))


# Chebyshev coefficients of erfc(x) = t exp(-x^2 + P(t)), t = 1 / (1 + x / 2), x >= 0: Press et al., Numerical
# Recipes (2nd ed.) section 6.2, fractional error below 1.2e-7 for every x >= 0.
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
                1.48851587, -0.82215223, 0.17087277)


def log_erfc(x: torch.Tensor) -> torch.Tensor:
    """log erfc(x), in log space so the upper tail never underflows; exportable (ONNX has Erf, no Erfc)."""
    a = x.abs()
    t = 1.0 / (1.0 + 0.5 * a)
    poly = torch.full_like(t, _ERFC_COEFFS[-1])
    for c in reversed(_ERFC_COEFFS[:-1]):
        poly = poly * t + c
    log_upper = torch.log(t) - a * a + poly  # log erfc(|x|)
    return torch.where(x >= 0, log_upper, torch.log(2.0 - torch.exp(log_upper)))  # erfc(-a) = 2 - erfc(a)


class Head(nn.Module):
    """Maps raw parameters (B, P, C, H, W) to level log-probabilities (B, C, H, W, K)."""

    name: str = ""
    params_per_channel: int = 0

    def __init__(self, levels: int) -> None:
        super().__init__()
        if not 2 <= levels <= 256:
            raise ValueError(f"levels must be in [2, 256], got {levels}")
        self.levels = levels

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        return self.log_probs(params)

    def log_probs(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BernoulliHead(Head):
    """One logit per sub-pixel: log p(1) = log sigmoid(l), log p(0) = log sigmoid(-l)."""

    name = "bernoulli"

    def __init__(self, levels: int) -> None:
        super().__init__(levels)
        if levels != 2:
            raise ValueError(f"the bernoulli likelihood needs levels == 2, got {levels}")
        self.params_per_channel = 1

    def log_probs(self, params: torch.Tensor) -> torch.Tensor:
        logit = params[:, 0]  # (B, C, H, W)
        return torch.stack([log_sigmoid(-logit), log_sigmoid(logit)], dim=-1)


class CategoricalHead(Head):
    """A K-way softmax per sub-pixel."""

    name = "categorical"

    def __init__(self, levels: int) -> None:
        super().__init__(levels)
        self.params_per_channel = levels

    def log_probs(self, params: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(params.movedim(1, -1), dim=-1)  # (B, C, H, W, K)


class LogisticMixtureHead(Head):
    """The discretized mixture of logistics of [2], per sub-pixel.

    Levels k = 0..K-1 sit at x_k = 2k/(K-1) - 1 in [-1, 1] with bins of half-width 1/(K-1); the outer
    bins extend to ±infinity. Channels are conditioned on each other by the network's masks (R -> G -> B)
    rather than by [2]'s linear coefficients, so each channel has its own mixture.
    """

    name = "logistic-mixture"

    def __init__(self, levels: int, n_mix: int) -> None:
        super().__init__(levels)
        if n_mix < 1:
            raise ValueError(f"n_mix must be >= 1, got {n_mix}")
        self.n_mix = n_mix
        self.params_per_channel = 3 * n_mix
        self.half_bin = 1.0 / (levels - 1)

    def log_probs(self, params: torch.Tensor) -> torch.Tensor:
        m = self.n_mix
        logit_pi = params[:, :m]  # (B, M, C, H, W)
        mean = params[:, m : 2 * m]
        log_scale = params[:, 2 * m :].clamp(min=-7.0)
        inv_s = torch.exp(-log_scale)[..., None]  # (B, M, C, H, W, 1)
        # The K-1 inner bin edges, built in the parameters' dtype so the bins telescope to exactly 1.
        k = torch.arange(self.levels - 1, dtype=params.dtype, device=params.device)
        edges = (2.0 * k + 1.0) * self.half_bin - 1.0
        z = (edges - mean[..., None]) * inv_s  # (B, M, C, H, W, K-1)
        # p_k = sigmoid(a) - sigmoid(b) with a = z_k (upper edge), b = z_{k-1} (lower edge), computed as
        # sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)) so it stays accurate far in the tails.
        log_cdf = log_sigmoid(z)  # log P(X <= upper edge of level k), k < K-1
        log_sf = log_sigmoid(-z)  # log P(X > upper edge of level k)
        width = 2.0 * self.half_bin * inv_s  # (B, M, C, H, W, 1) = a - b for inner levels
        log_width = log_one_minus_exp(width)
        inner = log_cdf[..., 1:] + log_sf[..., :-1] + log_width  # levels 1..K-2
        lp = torch.cat([log_cdf[..., :1], inner, log_sf[..., -1:]], dim=-1)  # (B, M, C, H, W, K)
        log_w = F.log_softmax(logit_pi, dim=1)[..., None]
        return torch.logsumexp(lp + log_w, dim=1)  # (B, C, H, W, K)


class DiscretizedGaussianHead(Head):
    """A Gaussian over [-1, 1] discretized to the K level bins (outer bins to ±infinity), so that its
    log-likelihood is a proper probability of the discrete data. Parameters: mean and log-scale."""

    name = "gaussian"

    def __init__(self, levels: int) -> None:
        super().__init__(levels)
        self.params_per_channel = 2
        self.half_bin = 1.0 / (levels - 1)

    def log_probs(self, params: torch.Tensor) -> torch.Tensor:
        mean = params[:, 0][..., None]  # (B, C, H, W, 1)
        inv_s = torch.exp(-params[:, 1].clamp(min=-7.0))[..., None]
        k = torch.arange(self.levels - 1, dtype=params.dtype, device=params.device)
        edges = (2.0 * k + 1.0) * self.half_bin - 1.0
        z = (edges - mean) * inv_s * (1.0 / math.sqrt(2.0))
        # log Phi at the edges, through log erfc for accuracy in both tails.
        log_cdf = log_erfc(-z) - math.log(2.0)
        log_sf = log_erfc(z) - math.log(2.0)
        # An inner bin's mass is a difference of two CDF values below the mean and of two survival values
        # above it, each taken where it does not cancel: Phi(b) - Phi(a) = Phi(b) (1 - exp(log Phi(a) - log Phi(b))).
        below = log_cdf[..., 1:] + log_one_minus_exp((log_cdf[..., 1:] - log_cdf[..., :-1]).clamp(min=1e-30))
        above = log_sf[..., :-1] + log_one_minus_exp((log_sf[..., :-1] - log_sf[..., 1:]).clamp(min=1e-30))
        # A bin narrow against the curvature (w (1 + |m|) < 0.3 in standard units) is computed from the
        # density at its middle instead, where both differences above lose precision in float32: the mass
        # is phi(m) w (1 + (m^2 - 1) w^2 / 24 + (m^4 - 6 m^2 + 3) w^4 / 1920), relative error < 1e-8.
        t = z * math.sqrt(2.0)
        m = 0.5 * (t[..., 1:] + t[..., :-1])
        w = (2.0 * self.half_bin) * inv_s  # (B, C, H, W, 1): not t's difference, which cancels in float32
        m2, w2 = m * m, w * w
        series = (m2 - 1.0) * w2 / 24.0 + (m2 * m2 - 6.0 * m2 + 3.0) * w2 * w2 / 1920.0
        narrow = -0.5 * m2 - 0.5 * math.log(2.0 * math.pi) + torch.log(w) + torch.log1p(series)
        inner = torch.where(w * (1.0 + m.abs()) < 0.3, narrow, torch.where(m < 0, below, above))
        lp = torch.cat([log_cdf[..., :1], inner, log_sf[..., -1:]], dim=-1)
        return lp - torch.logsumexp(lp, dim=-1, keepdim=True)  # renormalize what float rounding leaves


def make_head(likelihood: str, levels: int, n_mix: int = 5) -> Head:
    """The head named ``likelihood`` (one of LIKELIHOODS)."""
    if likelihood == "bernoulli":
        return BernoulliHead(levels)
    if likelihood == "categorical":
        return CategoricalHead(levels)
    if likelihood == "logistic-mixture":
        return LogisticMixtureHead(levels, n_mix)
    if likelihood == "gaussian":
        return DiscretizedGaussianHead(levels)
    raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")


def nll_from_log_probs(log_probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in nats per image.

    log_probs: (B, C, H, W, K); x: (B, C, H, W) integer levels. Returns (B,).
    """
    picked = log_probs.gather(-1, x.long().unsqueeze(-1)).squeeze(-1)  # (B, C, H, W)
    return -picked.flatten(1).sum(1)


def bits_per_dim(nats_per_image: float, dims: int) -> float:
    return nats_per_image / (dims * math.log(2.0))
