"""Turning decoder outputs into images (numpy only): shared by the runtime's latent samplers and the
trainer's sample grids."""

from __future__ import annotations

import numpy as np

from .decoding import inverse_cdf

IMAGE_MODES = ("mean", "sample")


def levels_from_log_probs(log_probs: np.ndarray, mode: str = "mean", u: np.ndarray | None = None) -> np.ndarray:
    """(B, C, H, W, K) log-probabilities -> uint8 levels (B, H, W, C).

    ``mean``: the expected level, rounded (deterministic). ``sample``: each sub-pixel drawn by inverse CDF
    with the uniforms ``u`` (B, H, W, C).
    """
    if mode == "sample":
        if u is None:
            raise ValueError("mode 'sample' needs uniforms")
        x = inverse_cdf(log_probs, u.transpose(0, 3, 1, 2))
    elif mode == "mean":
        lp = log_probs.astype(np.float64)
        p = np.exp(lp - lp.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        x = np.rint((p * np.arange(lp.shape[-1])).sum(axis=-1))
    else:
        raise ValueError(f"unknown image mode {mode!r}; choose one of {', '.join(IMAGE_MODES)}")
    return x.transpose(0, 2, 3, 1).astype(np.uint8)


def levels_from_mean(x: np.ndarray, levels: int) -> np.ndarray:
    """Reconstructions in [-1, 1], (B, C, H, W) -> the nearest uint8 levels (B, H, W, C)."""
    q = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 0.5 * (levels - 1))
    return q.transpose(0, 2, 3, 1).astype(np.uint8)
