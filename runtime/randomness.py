"""Reproducible random numbers: everything image i needs comes from (seed, i) alone.

The numbers are drawn up front per image, so the same seed gives the same images whatever the batch size,
the backend, or how the indices are split between processes.
"""

from __future__ import annotations

import numpy as np


def image_rng(seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be non-negative, got {seed}, {index}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def uniforms(seed: int, start: int, stop: int, shape: tuple[int, ...]) -> np.ndarray:
    """One uniform in [0, 1) per sub-pixel of images start..stop-1: float64 (stop - start, *shape)."""
    return np.stack([image_rng(seed, i).random(shape) for i in range(start, stop)])


def normals(seed: int, start: int, stop: int, size: int) -> np.ndarray:
    """One standard normal latent vector per image: float64 (stop - start, size)."""
    return np.stack([image_rng(seed, i).standard_normal(size) for i in range(start, stop)])
