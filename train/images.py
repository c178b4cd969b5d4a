"""PNG grids of sampled images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .checkpoint import atomic_open


def to_display(images: np.ndarray, levels: int) -> np.ndarray:
    """uint8 levels in [0, levels - 1] -> uint8 intensities in [0, 255]."""
    if levels == 256:
        return images
    return (images.astype(np.float64) * (255.0 / (levels - 1))).round().astype(np.uint8)


def make_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) -> one (rows * (H + pad) + pad, cols * (W + pad) + pad, C) image."""
    n, h, w, c = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = im
    return grid


def save_grid(path: str | Path, images: np.ndarray, *, levels: int, nrow: int | None = None, scale: int = 0) -> None:
    """Write a PNG grid; small images are upscaled (nearest) so a grid of 8x8 digits is visible."""
    from PIL import Image

    grid = make_grid(to_display(images, levels), nrow=nrow)
    s = scale or max(1, 256 // max(grid.shape[:2]))
    if s > 1:
        grid = grid.repeat(s, axis=0).repeat(s, axis=1)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_open(path, "wb") as f:
        im.save(f, format="PNG")
