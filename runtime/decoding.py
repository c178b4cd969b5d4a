"""The autoregressive decoding loops, written once for every backend.

Two methods, one order (raster over pixels, R -> G -> B within a pixel) and one sampling rule (inverse-CDF
with one pre-drawn uniform per sub-pixel, see randomness.py):
- naive: ``forward(x, labels) -> log_probs`` (x float32 (B, C, H, W) levels, log_probs (B, C, H, W, K)),
  one full forward pass per sub-pixel;
- cached: a ``Stepper`` (the model's incremental form, models/incremental.py) that computes per sub-pixel
  only what that sub-pixel changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from .progress import Progress

ForwardFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def inverse_cdf(log_probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The level whose CDF interval holds u: log_probs (..., K), u (...) in [0, 1) -> int64 (...).

    The CDF is accumulated in float64 and renormalized, so rounding in the backend's log-probabilities
    moves a sample only when u lies within that rounding of a bin edge.
    """
    lp = log_probs.astype(np.float64)
    p = np.exp(lp - lp.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    target = u[..., None] * cdf[..., -1:]
    return (cdf[..., :-1] <= target).sum(axis=-1)


def naive_decode(
    forward: ForwardFn,
    u: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    levels: int,
    prefix: np.ndarray | None = None,
    start_row: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """Generate images by one full forward pass per sub-pixel (O(N^2) work for N sub-pixels).

    u: (B, H, W, C) uniforms. ``prefix`` (B, H, W, C) levels with ``start_row``: rows above start_row are
    kept from prefix and the rest sampled (image completion). Returns uint8 (B, H, W, C).
    """
    b, h, w, c = u.shape
    x = _start_image(u, prefix, start_row)
    for i in range(start_row, h):
        for j in range(w):
            for k in range(c):
                log_probs = forward(x, labels)  # (B, C, H, W, K)
                x[:, k, i, j] = inverse_cdf(log_probs[:, k, i, j], u[:, i, j, k])
        if progress is not None:
            progress.update(b)  # images x rows
    return _finish(x, levels)


class Stepper(Protocol):
    """The cached form of a model as a backend runs it; the caches live inside, on the backend's device."""

    def reset(self, batch: int, labels: np.ndarray | None) -> None: ...

    def row(self, x_prev_row: np.ndarray, has_prev: bool) -> None:
        """Start the next row; x_prev_row (B, C, W) is the finished previous row."""
        ...

    def step(self, x_row: np.ndarray, j: int) -> np.ndarray:
        """x_row (B, C, W): the current row so far -> log-probabilities of pixel j, (B, C, K)."""
        ...


def cached_decode(
    stepper: Stepper,
    u: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    levels: int,
    prefix: np.ndarray | None = None,
    start_row: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """Generate images with the cached form: about one forward pass of work per image (O(N)).

    Same arguments and result as ``naive_decode``; with the same uniforms both give the same images. The
    rows kept from ``prefix`` are fed through ``step`` once per pixel so the caches hold them.
    """
    b, h, w, c = u.shape
    x = _start_image(u, prefix, start_row)
    stepper.reset(b, labels)
    for i in range(h):
        stepper.row(np.ascontiguousarray(x[:, :, i - 1] if i else x[:, :, 0] * 0), i > 0)
        for j in range(w):
            if i < start_row:
                stepper.step(np.ascontiguousarray(x[:, :, i]), j)
                continue
            for k in range(c):
                log_probs = stepper.step(np.ascontiguousarray(x[:, :, i]), j)  # (B, C, K)
                x[:, k, i, j] = inverse_cdf(log_probs[:, k], u[:, i, j, k])
        if progress is not None:
            progress.update(b)
    return _finish(x, levels)


def _start_image(u: np.ndarray, prefix: np.ndarray | None, start_row: int) -> np.ndarray:
    """The image being decoded, float32 (B, C, H, W): zeros, with the kept rows of ``prefix`` filled in."""
    b, h, w, c = u.shape
    x = np.zeros((b, c, h, w), dtype=np.float32)
    if prefix is not None and start_row > 0:
        x[:, :, :start_row] = prefix.transpose(0, 3, 1, 2)[:, :, :start_row]
    return x


def _finish(x: np.ndarray, levels: int) -> np.ndarray:
    if x.max(initial=0) >= levels:
        raise RuntimeError(f"decoded a level >= {levels}: the backend returned a malformed distribution")
    return x.transpose(0, 2, 3, 1).astype(np.uint8)
