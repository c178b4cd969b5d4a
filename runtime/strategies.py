"""The autoregressive decoders as one table of strategies. Each knows its public name (``decoder=...``), what
it needs from a bundle and a backend, and how to decode a batch; the sampler, ``decoder="auto"``, the CLI's
choices and the errors all read ``STRATEGIES``. Several strategies may share a name: ``"cached"`` is the
fused Triton kernel where the backend has one, else the stepped cached form; ``"parallel"`` is windowed where
the bundle has a window graph for the backend, else whole-forward. The first that runs is the one used.

The loops themselves are in decoding.py; a strategy hands them a ``DecodeRequest``'s fields."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from .backends import Backend, cache_inputs
from .bundle import Bundle
from .decoding import WindowFn, naive_decode, parallel_decode, split_cached_decode, window_decode
from .policy import cached_threads
from .progress import Progress


class AutoregressiveSampler(Protocol):
    """What a strategy uses of the sampler (sampler.AutoregressiveSampler; named here, not imported, so the
    table does not import the sampler that reads it)."""

    bundle: Bundle
    backend: Backend
    image_shape: tuple[int, int, int]

    def forward(self, x: np.ndarray, labels: np.ndarray | None) -> np.ndarray: ...


@dataclass(frozen=True)
class DecodeRequest:
    """One batch to decode: uniforms (B, H, W, C) float64, labels (B,) or None, the number of levels, and for
    completion the known images (B, H, W, C) uint8 with the number of their rows kept (``start_row``)."""

    uniforms: np.ndarray
    labels: np.ndarray | None
    levels: int
    prefix: np.ndarray | None = None
    start_row: int = 0

    def __len__(self) -> int:
        return len(self.uniforms)

    def __getitem__(self, part: slice) -> DecodeRequest:
        """The request for images ``part`` of this batch."""
        return replace(self, uniforms=self.uniforms[part],
                       labels=None if self.labels is None else self.labels[part],
                       prefix=None if self.prefix is None else self.prefix[part])

    @property
    def keywords(self) -> dict[str, Any]:
        """What every loop in decoding.py takes beside its graph function and the uniforms."""
        return {"labels": self.labels, "levels": self.levels, "prefix": self.prefix, "start_row": self.start_row}


class Strategy:
    """One way to decode. ``offered``: the bundle has what it needs (the manifest's ``decoders``, graphs);
    ``unusable``: why it cannot run on this backend, or None; ``decode``: (images uint8 (B, H, W, C), stats)."""

    name: ClassVar[str]

    def offered(self, bundle: Bundle) -> bool:
        return self.name in bundle.manifest.get("decoders", ["naive"])

    def unusable(self, bundle: Bundle, backend: Backend) -> str | None:
        return None

    def available(self, bundle: Bundle, backend: Backend) -> bool:
        return self.offered(bundle) and self.unusable(bundle, backend) is None

    def decode(self, sampler: AutoregressiveSampler, request: DecodeRequest, bar: Progress
               ) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError


class FusedTriton(Strategy):
    """Whole images in one kernel launch per batch (triton_kernels/decoders.py), on the Triton backend."""

    name = "cached"

    def unusable(self, bundle: Bundle, backend: Backend) -> str | None:
        return None if backend.fused else f"the {backend.name} backend has no fused decoder for this model"

    def decode(self, sampler: AutoregressiveSampler, request: DecodeRequest, bar: Progress
               ) -> tuple[np.ndarray, dict[str, Any]]:
        r = request
        return sampler.backend.decode_images(r.uniforms, r.labels, r.prefix, r.start_row), {}  # type: ignore[attr-defined]


class Cached(Strategy):
    """The row/step graphs, about one forward pass per image; large batches split between threads where the
    backend's steps run single-threaded (policy.cached_threads)."""

    name = "cached"

    def decode(self, sampler: AutoregressiveSampler, request: DecodeRequest, bar: Progress
               ) -> tuple[np.ndarray, dict[str, Any]]:
        backend = sampler.backend
        steppers = [backend.stepper() for _ in range(cached_threads(len(request), backend.name, backend.device))]
        return split_cached_decode(steppers, request.uniforms, **request.keywords, bar=bar), {}


class Naive(Strategy):
    """The forward graph once per sub-pixel: O(N^2), the reference the others are tested against."""

    name = "naive"

    def decode(self, sampler: AutoregressiveSampler, request: DecodeRequest, bar: Progress
               ) -> tuple[np.ndarray, dict[str, Any]]:
        return naive_decode(sampler.forward, request.uniforms, **request.keywords, bar=bar), {}


class Graph(Strategy):
    """The bundle's sample.onnx: the cached loop inside one ONNX graph."""

    name = "graph"

    def unusable(self, bundle: Bundle, backend: Backend) -> str | None:
        if backend.graph_format == "onnx":
            return None
        return f"decoder 'graph' runs sample.onnx on the onnx backend, not {backend.name}"

    def decode(self, sampler: AutoregressiveSampler, request: DecodeRequest, bar: Progress
               ) -> tuple[np.ndarray, dict[str, Any]]:
        r = request
        h, w, c = sampler.image_shape
        feed = {"uniforms": r.uniforms,
                "prefix": np.zeros((len(r), h, w, c), np.uint8) if r.prefix is None else r.prefix,
                "start_row": np.array([r.start_row], dtype=np.int64)}
        if r.labels is not None:
            feed["labels"] = r.labels
        out = sampler.backend.run("sample", feed)[0]
        bar.update(len(r) * h)
        return out, {}


def _parallel_stats(method: str, stats: dict[str, Any], batch: int) -> dict[str, Any]:
    return {"method": method, "passes": stats["passes"],
            "forward_passes": stats["forward_passes_per_image"] * batch, "parallel_images": batch}


class WindowParallel(Strategy):
    """The fixed point of the sampling rule through the bundle's window graph (decoding.window_decode)."""

    name = "parallel"

    def offered(self, bundle: Bundle) -> bool:
        return "naive" in bundle.manifest.get("decoders", ["naive"])  # wherever naive works: forward alone

    def unusable(self, bundle: Bundle, backend: Backend) -> str | None:
        fmt = backend.graph_format
        return None if fmt and f"window.{fmt}" in bundle.manifest["graphs"] else "no window graph for this backend"

    def decode(self, sampler: AutoregressiveSampler, request: DecodeRequest, bar: Progress
               ) -> tuple[np.ndarray, dict[str, Any]]:
        stats: dict[str, Any] = {}
        fmt = sampler.backend.graph_format
        assert fmt is not None
        start = self.start_caches(sampler, fmt, len(request), request.labels)
        out = window_decode(self.window_fn(sampler, fmt), start, request.uniforms, **request.keywords,
                            bar=bar, stats=stats)
        return out, _parallel_stats("window", stats, len(request))

    @staticmethod
    def window_fn(sampler: AutoregressiveSampler, fmt: str) -> WindowFn:
        # Caches travel in the manifest's order; the ONNX file may not take those the window never reads.
        state = sampler.bundle.manifest["graphs"][f"window.{fmt}"]["state"]

        def window(x_rows: np.ndarray, advance: int, caches: list, labels: np.ndarray | None
                   ) -> tuple[np.ndarray, list]:
            feed = {"x_rows": x_rows.astype(np.float32, copy=False), "advance": np.array([advance], np.int64),
                    **{s["input"]: cache for s, cache in zip(state, caches, strict=True) if s["input"]}}
            if labels is not None:
                feed["labels"] = labels
            out = sampler.backend.run("window", feed)
            return out[0], out[1:]

        return window

    @staticmethod
    def start_caches(sampler: AutoregressiveSampler, fmt: str, batch: int, labels: np.ndarray | None
                     ) -> list[np.ndarray]:
        """The caches as the ``row`` graph leaves them at row 0: where windowed decoding starts."""
        _, w, c = sampler.image_shape
        feed = {name: np.zeros((batch, *shape), np.float32) for name, shape in cache_inputs(sampler.bundle, fmt)}
        feed.update(x_prev_row=np.zeros((batch, c, w), np.float32), has_prev=np.zeros(1, np.float32))
        if labels is not None:
            feed["labels"] = labels
        spec = sampler.bundle.graph("row", fmt)
        return sampler.backend.run("row", {i["name"]: feed[i["name"]] for i in spec.inputs})


class ForwardParallel(Strategy):
    """The fixed point of the sampling rule through the whole forward graph (decoding.parallel_decode)."""

    name = "parallel"
    offered = WindowParallel.offered

    def decode(self, sampler: AutoregressiveSampler, request: DecodeRequest, bar: Progress
               ) -> tuple[np.ndarray, dict[str, Any]]:
        stats: dict[str, Any] = {}
        out = parallel_decode(sampler.forward, request.uniforms, **request.keywords, bar=bar, stats=stats)
        return out, _parallel_stats("forward", stats, len(request))


# In preference order within a name.
STRATEGIES: tuple[Strategy, ...] = (FusedTriton(), Cached(), Naive(), Graph(), WindowParallel(), ForwardParallel())
DECODER_NAMES: tuple[str, ...] = tuple(dict.fromkeys(s.name for s in STRATEGIES))  # the public names


def offered(bundle: Bundle) -> list[str]:
    """The decoder names this bundle offers (some may not run on every backend: see ``strategy``)."""
    return [name for name in DECODER_NAMES if any(s.offered(bundle) for s in STRATEGIES if s.name == name)]


def strategy(name: str, bundle: Bundle, backend: Backend) -> Strategy | str:
    """The strategy that runs decoder ``name`` here, or why none can (name must be one of DECODER_NAMES)."""
    named = [s for s in STRATEGIES if s.name == name and s.offered(bundle)]
    for s in named:
        if s.unusable(bundle, backend) is None:
            return s
    if not named:
        return f"this bundle has no {name} decoder (it has: {', '.join(offered(bundle))})"
    return str(named[-1].unusable(bundle, backend))
