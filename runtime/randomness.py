"""Reproducible random numbers: everything image i needs comes from (seed, i) alone.

The numbers are drawn up front per image, so the same seed gives the same images whatever the batch size,
the backend, or how the indices are split between processes.
"""

from __future__ import annotations

import numpy as np


def image_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Stream 0 serves each family's main draw (pixel uniforms, or latents); stream 1 the pixel uniforms
    of a latent model sampled in ``sample`` mode, so the two never share numbers."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be non-negative, got {seed}, {index}")
    entropy = [seed, index] if stream == 0 else [seed, index, stream]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def uniforms(seed: int, start: int, stop: int, shape: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """One uniform in [0, 1) per sub-pixel of images start..stop-1: float64 (stop - start, *shape)."""
    return np.stack([image_rng(seed, i, stream).random(shape) for i in range(start, stop)])


def normals(seed: int, start: int, stop: int, size: int) -> np.ndarray:
    """One standard normal latent vector per image: float64 (stop - start, size)."""
    return np.stack([image_rng(seed, i).standard_normal(size) for i in range(start, stop)])
