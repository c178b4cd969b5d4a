"""Held-out scores computed once, in numpy, for training's per-epoch evaluation and ``gen-eval`` alike:
the same estimates under the same metric names, whether the model is eager PyTorch or an exported bundle.

- ``latent_totals``: a batch's sums for an autoencoder (squared error of the reconstruction of the code)
  or a VAE (the single-sample ELBO's two terms, and the k-sample importance-weighted estimate of
  -log p(x), Burda et al. 2016), with the noise of image i drawn from (seed, i) alone.
- ``summarize``: the per-image metrics from the sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from genforge.runtime.randomness import normals

Encode = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]  # x -> (mean, logvar)
Decode = Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # z -> log-probs (VAE) or x_mean (autoencoder)


def picked_log_prob(log_probs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sum over sub-pixels of log p(x): log_probs (B, C, H, W, K), x (B, C, H, W) levels -> (B,)."""
    lp = np.take_along_axis(log_probs.astype(np.float64), x[..., None].astype(np.int64), axis=-1)[..., 0]
    return lp.reshape(len(x), -1).sum(1)


def add(totals: dict[str, float], key: str, value: float) -> None:
    totals[key] = totals.get(key, 0.0) + float(value)


def latent_totals(encode: Encode, decode: Decode, x: np.ndarray, y: np.ndarray | None, *, variational: bool,
                  levels: int, first: int, seed: int, iw_samples: int, totals: dict[str, float]) -> None:
    """Add one batch's sums to ``totals``. x: (B, C, H, W) levels of images first..first+B-1."""
    mean, logvar = (a.astype(np.float64) for a in encode(x, y))
    if not variational:
        rec = decode(mean, y).astype(np.float64)
        target = x * (2.0 / (levels - 1)) - 1.0
        add(totals, "l2", ((rec - target) ** 2).reshape(len(x), -1).sum())
        return
    std = np.exp(0.5 * logvar)
    k, zdim = iw_samples, mean.shape[1]
    # One row of noise per image and sample, from (seed, image index): the same numbers for run and bundle.
    eps_all = normals(seed, first, first + len(x), zdim * (max(k, 1) + 1)).reshape(len(x), max(k, 1) + 1, zdim)
    rec = picked_log_prob(decode(mean + std * eps_all[:, 0], y), x)
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1.0 - logvar).sum(1)
    add(totals, "rec", -rec.sum())
    add(totals, "kl", kl.sum())
    if k:
        log_w = []
        for s in range(k):
            eps = eps_all[:, s + 1]
            zs = mean + std * eps
            log_q = (-0.5 * eps**2 - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(1)
            log_p = (-0.5 * zs**2 - 0.5 * math.log(2 * math.pi)).sum(1)
            log_w.append(picked_log_prob(decode(zs, y), x) + log_p - log_q)
        lw = np.stack(log_w)  # (k, B)
        m = lw.max(0)
        add(totals, "iwae", -(m + np.log(np.exp(lw - m).mean(0))).sum())


def summarize(totals: dict[str, float], n: int, *, dims: int, iw_samples: int) -> dict[str, float]:
    """Per-image metrics: nats_per_image and bits_per_dim (autoregressive), l2_per_image (autoencoder),
    neg_elbo, reconstruction_nats, kl_nats, and iwae_nll with iw_samples (VAE)."""
    if "nll" in totals:
        nats = totals["nll"] / n
        return {"nats_per_image": nats, "bits_per_dim": nats / (dims * math.log(2.0))}
    if "l2" in totals:
        return {"l2_per_image": totals["l2"] / n}
    if "rec" in totals:
        out = {"neg_elbo": (totals["rec"] + totals["kl"]) / n, "reconstruction_nats": totals["rec"] / n,
               "kl_nats": totals["kl"] / n}
        if "iwae" in totals:
            out["iwae_nll"] = totals["iwae"] / n
            out["iw_samples"] = float(iw_samples)
        return out
    return {}
