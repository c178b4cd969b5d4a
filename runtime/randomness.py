"""Reproducible random numbers: everything image i needs comes from (seed, i) alone.

The scheme is counter-based so that any language (or a GPU kernel) reproduces it bit for bit from a few
dozen lines, and docs/bundle.md ("Randomness") is its specification:

- Generator: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; the same
  bijection as Random123's ``philox4x32``, cuRAND's Philox and Triton's ``tl.philox``).
- Key: (seed mod 2^32, seed div 2^32) for a seed in [0, 2^64).
- Counter of block b of image i in stream s: (b, i mod 2^32, i div 2^32, s). One block gives four 32-bit
  words w0..w3.
- Uniforms: block b gives uniforms 2b and 2b + 1 of the image, (w0 * 2^21 + (w1 >> 11)) * 2^-53 and the same
  of (w2, w3): float64 in [0, 1), exact in any IEEE double arithmetic. An image's uniforms fill the requested
  shape in row-major order ((H, W, C) for the autoregressive families).
- Normals: element k of a latent vector comes from block k alone: u1, u2 its two uniforms,
  sqrt(-2 * log(1 - u1)) * cos(6.283185307179586 * u2) (Box-Muller, evaluated in that order in float64).
  1 - u1 is exact and never 0. log and cos come from the platform's math library, which IEEE 754 does not
  require to be correctly rounded, so another platform's normal can differ in the last bit; the float32 the
  graphs take then agrees except when the float64 lies within that bit of a float32 rounding boundary.

Stream 0 serves each family's main draw (pixel uniforms, or latents); stream 1 the pixel uniforms of a
latent model sampled in ``sample`` mode, so the two never share numbers.
"""

from __future__ import annotations

import numpy as np

SCHEME = {"name": "philox4x32-10", "version": 1}

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)
_TWO_PI = 6.283185307179586


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32 of each counter: counter uint (..., 4) words < 2^32, key two words -> uint64 (..., 4) words."""
    c = np.asarray(counter, dtype=np.uint64) & _MASK
    c0, c1, c2, c3 = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    k0, k1 = np.uint64(key[0]) & _MASK, np.uint64(key[1]) & _MASK
    for _ in range(rounds):
        p0 = _M0 * c0  # < 2^64: exact in uint64
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return np.stack([c0, c1, c2, c3], axis=-1)


def _check(seed: int, start: int, stop: int, stream: int) -> None:
    for name, v in (("seed", seed), ("image index", start), ("image index", max(stop - 1, 0)), ("stream", stream)):
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2**64 or (name == "stream" and v >= 2**32):
            raise ValueError(f"{name} must be an integer in [0, 2^{32 if name == 'stream' else 64}), got {v!r}")


def blocks(seed: int, start: int, stop: int, count: int, stream: int = 0) -> np.ndarray:
    """The first ``count`` Philox blocks of images start..stop-1: uint64 (stop - start, count, 4) words."""
    _check(seed, start, stop, stream)
    images = np.arange(start, stop, dtype=np.uint64)[:, None]
    b = np.arange(count, dtype=np.uint64)[None, :]
    counter = np.stack(np.broadcast_arrays(b, images & _MASK, images >> np.uint64(32), np.uint64(stream)), axis=-1)
    return philox4x32(counter, (int(seed) & 0xFFFFFFFF, int(seed) >> 32))


def _to_unit(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Two words -> a float64 in [0, 1) with 53 random bits."""
    return (hi.astype(np.float64) * 2.0**21 + (lo >> np.uint64(11)).astype(np.float64)) * 2.0**-53


def uniforms(seed: int, start: int, stop: int, shape: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """One uniform in [0, 1) per element of ``shape`` for images start..stop-1: float64 (stop - start, *shape)."""
    size = int(np.prod(shape, dtype=np.int64))
    w = blocks(seed, start, stop, (size + 1) // 2, stream)
    u = np.stack([_to_unit(w[..., 0], w[..., 1]), _to_unit(w[..., 2], w[..., 3])], axis=-1)
    return u.reshape(stop - start, -1)[:, :size].reshape(stop - start, *shape)


def normals(seed: int, start: int, stop: int, size: int, stream: int = 0) -> np.ndarray:
    """One standard normal vector of ``size`` per image: float64 (stop - start, size)."""
    w = blocks(seed, start, stop, size, stream)
    u1, u2 = _to_unit(w[..., 0], w[..., 1]), _to_unit(w[..., 2], w[..., 3])
    return np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(_TWO_PI * u2)
