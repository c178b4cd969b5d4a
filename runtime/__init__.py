"""genforge.runtime: load a bundle and sample from it. Imports numpy only; torch, onnxruntime and triton
are imported by the backend that needs them.

    from genforge.runtime import load
    model = load("bundle/")                          # backend="auto", device="auto"
    images = model.sample(64, seed=0, batch_size=32)  # uint8 levels, (N, H, W, C)
"""

from __future__ import annotations

from pathlib import Path

from .backends import BACKENDS, RuntimeBackendError, make_backend
from .bundle import Bundle, BundleError, read_bundle
from .sampler import AutoregressiveSampler, GANSampler, InputError, LatentSampler, Sampler


def load(path: str | Path, backend: str = "auto", device: str = "auto") -> Sampler:
    """Validate the bundle at ``path`` (manifest, version, hashes) and return its sampler."""
    bundle = read_bundle(path)
    runner = make_backend(bundle, backend, device)
    if bundle.family == "autoregressive":
        return AutoregressiveSampler(bundle, runner)
    if bundle.family == "latent":
        return LatentSampler(bundle, runner)
    if bundle.family == "gan":
        return GANSampler(bundle, runner)
    raise BundleError(f"{bundle.path}: unknown model family {bundle.family!r} in the manifest")


__all__ = [
    "BACKENDS",
    "AutoregressiveSampler",
    "Bundle",
    "BundleError",
    "GANSampler",
    "InputError",
    "LatentSampler",
    "RuntimeBackendError",
    "Sampler",
    "load",
    "read_bundle",
]
