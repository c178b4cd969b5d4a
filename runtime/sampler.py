"""Samplers: what ``genforge.runtime.load`` returns. They own batching, labels and randomness; the
decoding loop itself is in decoding.py and the graphs run in a backend."""

from __future__ import annotations

import numbers
import time

import numpy as np

from .backends import Backend
from .bundle import Bundle
from .errors import InputError
from .latent import levels_from_log_probs, levels_from_mean
from .policy import (  # noqa: F401 (the auto policy, importable from here as before)
    CACHED_THREAD_MIN_IMAGES,
    PARALLEL_MAX_BATCH,
    TUNE_MAX_BATCH,
    TUNE_RETRY,
    WINDOW_PARALLEL_MAX_BATCH,
    DecoderTuner,
    auto_decoder,
    cached_threads,
    tuned,
)
from .progress import Progress, chunks
from .randomness import normals, uniforms
from .strategies import DECODER_NAMES, DecodeRequest, Strategy, WindowParallel, offered, strategy


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


MAX_SEED = 2**64 - 1  # seeds key Philox4x32 with 64 bits
MAX_INDEX = 2**63 - 1
# The most sub-pixels one call of a graph gets: a graph's working memory grows with its batch (a VAE's hidden
# layers, a PixelCNN's feature maps), and an allocation past what the machine holds gets the process killed by
# the kernel rather than an error, so a larger batch_size runs as several batches of this size. Every image's
# random numbers come from (seed, image index), so the split changes no result; 2**21 is 2,674 binarized MNIST
# images, past the batch where the CPU graphs stop getting faster per image.
MAX_BATCH_SUBPIXELS = 2**21


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """An integer argument in [low, high]; numbers.Integral covers numpy integers, bool is refused (True is no
    image count)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise InputError(f"{name} must be in [{low}, {high}], got {value}" if high is not None
                         else f"{name} must be >= {low}, got {value}")
    return int(value)


def as_latents(z: object, latent_size: int) -> np.ndarray:
    """Latent vectors (N, Z) as float64, refusing what is not finite numbers."""
    try:
        arr = np.asarray(z, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise InputError(f"latents must be numbers ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != latent_size:
        raise InputError(f"expected latents of shape (N, {latent_size}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError("latents must be finite (NaN or infinity decodes to nothing meaningful)")
    return arr


LATENT_MODES = ("mean", "sample")


class Sampler:
    """Common to every family: the bundle, the backend, batching and labels."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle = bundle
        self.backend = backend
        self.image_shape = bundle.image_shape  # (H, W, C)
        self.levels = bundle.levels
        self.num_classes = bundle.num_classes

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        return (f"{type(self).__name__}(model={self.bundle.model!r}, image={h}x{w}x{c}, levels={self.levels}, "
                f"backend={self.backend.name!r}, device={self.backend.device!r})")

    def resolve_labels(self, n: int, labels: np.ndarray | list[int] | None, start: int = 0) -> np.ndarray | None:
        """Class labels for images start..start+n-1: as given, or image i gets class i % num_classes."""
        if not self.num_classes:
            if labels is not None:
                raise InputError("this model is unconditional: do not pass labels")
            return None
        if labels is None:
            return np.arange(start, start + n, dtype=np.int64) % self.num_classes
        try:
            given = np.asarray(labels)
        except (ValueError, TypeError) as e:
            raise InputError(f"labels must be integers ({e})") from None
        if given.size and given.dtype.kind not in "iu":  # 1.7 would silently become class 1
            raise InputError(f"labels must be integers, got {given.dtype} values")
        if given.size and given.dtype.kind == "u" and given.max() > np.iinfo(np.int64).max:
            raise InputError(f"labels must lie in [0, {self.num_classes - 1}]")
        arr = given.astype(np.int64).reshape(-1)
        if arr.shape != (n,):
            raise InputError(f"expected {n} labels, got {arr.size}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
            raise InputError(f"labels must lie in [0, {self.num_classes - 1}]")
        return arr

    def check_request(self, n: object, seed: object, batch_size: object, start: object = 0) -> int:
        """Validate the arguments every sample() takes, and that the result fits in memory; returns n."""
        for name, value, low, high in (("n", n, 0, MAX_INDEX), ("seed", seed, 0, MAX_SEED),
                                       ("batch_size", batch_size, 1, MAX_INDEX), ("start", start, 0, MAX_INDEX)):
            check_int(name, value, low, high)
        if int(start) + int(n) > MAX_INDEX:
            raise InputError(f"start + n must be at most {MAX_INDEX} (image indices are 63-bit)")
        return self.check_memory(int(n), int(batch_size), 8 * 4)

    def work_batch(self, batch_size: int) -> int:
        """The batch one graph call runs: batch_size, or fewer so it stays under MAX_BATCH_SUBPIXELS."""
        h, w, c = self.image_shape
        return max(1, min(int(batch_size), MAX_BATCH_SUBPIXELS // (h * w * c)))

    def check_memory(self, n: int, batch_size: int, per_subpixel: int) -> int:
        """Refuse a request whose uint8 result plus one batch of ``per_subpixel``-byte working arrays would not
        fit in the memory available now; returns n."""
        h, w, c = self.image_shape
        need = int(n) * h * w * c  # the uint8 result; batches of random numbers come on top, one at a time
        # One batch of float64 uniforms and working arrays.
        batch = min(int(n), self.work_batch(batch_size)) * h * w * c * per_subpixel
        available = available_memory()
        if available is not None and need + batch > available:
            raise InputError(
                f"{n} images of {h}x{w}x{c} need {(need + batch) / 2**30:.3g} GiB, more than the "
                f"{available / 2**30:.3g} GiB of memory available; draw fewer at a time (start= continues the "
                "same sequence) or lower batch_size"
            )
        return int(n)

    def check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        h, w, c = self.image_shape
        if images.ndim != 4 or images.shape[1:] != (h, w, c):
            raise InputError(f"expected images of shape (N, {h}, {w}, {c}), got {images.shape}")
        if not np.issubdtype(images.dtype, np.integer):
            raise InputError(f"expected integer levels, got dtype {images.dtype}")
        if images.size and (images.min() < 0 or images.max() >= self.levels):
            raise InputError(f"image values must be levels in [0, {self.levels - 1}]")
        return images


class AutoregressiveSampler(Sampler):
    """Samples and scores images of an autoregressive bundle (PixelCNN, Gated PixelCNN, PixelRNN).

    ``decoder="cached"`` (the default where the bundle has the step graphs) runs the incremental form:
    about one forward pass per image. ``"naive"`` runs the full forward graph once per sub-pixel.
    ``"graph"`` runs the bundle's ``sample.onnx`` (the cached loop inside one ONNX graph; onnx backend).
    ``"parallel"`` iterates to the fixed point of the sampling rule: through the bundle's ``window`` graph
    where it has one (decoding.window_decode), else the whole forward graph (decoding.parallel_decode);
    ``last_stats`` then says which (``method``), how many passes each batch took and the forward-pass
    equivalents spent. With the same seed all give the same images; ``"auto"``
    picks by batch size and device (``auto_decoder``), except that on the CPU, for bundles with a window
    graph and batches of 9-``TUNE_MAX_BATCH`` images, where which is faster depends on the model, it times
    windowed parallel against cached decoding on the first two batches of a size and runs the faster after
    (``tuner``, a ``DecoderTuner``; ``last_stats["batch_decoders"]`` says what each batch ran).

    Names: ``start`` is always an image index (image i of a call is image ``start + i`` of the seed's
    sequence); ``rows`` (``complete``) are the rows kept from each image, which the decoding loops and the
    bundle's ``sample`` graph call ``start_row``, the first row they draw; a window's height is its ``depth``
    (``decoding.window_decode``); ``passes`` counts forward calls of parallel decoding; ``progress`` turns the
    progress bar on, ``bar`` is the bar itself.
    """

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        super().__init__(bundle, backend)
        self.tuner = DecoderTuner()
        self.last_stats: dict = {}  # replaced per call: what the last sample()/complete() did

    @property
    def offered_decoders(self) -> list[str]:
        """The decoder names this bundle offers (strategies.offered), a subset of ``DECODER_NAMES`` (every name
        the runtime knows): the manifest's ``decoders`` list (what the exporter wrote: naive, cached, graph),
        and parallel wherever naive works (it needs the forward graph alone, so the manifest never lists it)."""
        return offered(self.bundle)

    def _strategy(self, decoder: str) -> Strategy:
        """The strategy that runs ``decoder`` (a public name) on this backend, or an InputError saying why none."""
        if decoder not in DECODER_NAMES:
            raise InputError(f"unknown decoder {decoder!r}; choose one of auto, {', '.join(DECODER_NAMES)}")
        found = strategy(decoder, self.bundle, self.backend)
        if isinstance(found, str):
            raise InputError(found)
        return found

    def _windowed(self) -> bool:
        """Whether "parallel" is windowed here (the bundle has a window graph this backend runs)."""
        return isinstance(strategy("parallel", self.bundle, self.backend), WindowParallel)

    def _resolve_decoder(self, decoder: str, batch: int = 1) -> str:
        """The decoder name a request runs: ``decoder``, checked, or for "auto" the rule's pick for ``batch``."""
        if decoder == "auto":
            return auto_decoder(self.offered_decoders, batch, self.backend.name, self.backend.device,
                                windowed=self._windowed())
        self._strategy(decoder)
        return decoder

    def _decode(self, request: DecodeRequest, decoder: str, bar: Progress) -> np.ndarray:
        """One batch through ``decoder``'s strategy; what it reports joins ``last_stats``."""
        out, stats = self._strategy(decoder).decode(self, request, bar)
        st = self.last_stats
        for key, value in stats.items():
            if key == "method":
                st["method"] = value
            elif key == "passes":
                st.setdefault("passes", []).append(value)
            else:
                st[key] = st.get(key, 0) + value
        return out

    def _decode_auto(self, request: DecodeRequest, bar: Progress) -> tuple[np.ndarray, str]:
        """One batch with decoder="auto": the rule's decoder, or where it is unsure the tuner's, timed."""
        first = self._resolve_decoder("auto", len(request))
        if not tuned(len(request), self.backend.name, self.backend.device, windowed=self._windowed(),
                     candidates=set(self.offered_decoders)):
            return self._decode(request, first, bar), first
        key = (len(request), request.start_row, request.labels is not None)
        decoder = self.tuner.choose(key, first, "parallel" if first == "cached" else "cached")
        t = time.perf_counter()
        out = self._decode(request, decoder, bar)
        self.tuner.record(key, decoder, time.perf_counter() - t)
        return out, decoder

    def forward(self, x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """x float32 (B, C, H, W) levels -> log-probabilities (B, C, H, W, K)."""
        feed = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        if labels is not None:
            feed["labels"] = labels
        return self.backend.run("forward", feed)[0]

    def sample(
        self,
        n: int,
        *,
        seed: int = 0,
        batch_size: int = 64,
        labels: np.ndarray | list[int] | None = None,
        start: int = 0,
        decoder: str = "auto",
        progress: bool = False,
    ) -> np.ndarray:
        """n images as uint8 levels (n, H, W, C). Image i's randomness comes from (seed, start + i) alone."""
        return self._generate(n, None, 0, seed, batch_size, labels, start, decoder, progress)

    def complete(
        self,
        images: np.ndarray,
        rows: int,
        *,
        seed: int = 0,
        batch_size: int = 64,
        labels: np.ndarray | list[int] | None = None,
        start: int = 0,
        decoder: str = "auto",
        progress: bool = False,
    ) -> np.ndarray:
        """Keep the first ``rows`` rows of each image and sample the rest: uint8 (N, H, W, C)."""
        images = self.check_images(images)
        if not isinstance(rows, numbers.Integral) or isinstance(rows, bool) or not 0 <= rows <= self.image_shape[0]:
            raise InputError(f"rows must be in [0, {self.image_shape[0]}], got {rows}")
        return self._generate(len(images), images, rows, seed, batch_size, labels, start, decoder, progress)

    def _generate(
        self, n: int, prefix: np.ndarray | None, rows: int, seed: int, batch_size: int,
        labels: np.ndarray | list[int] | None, start: int, decoder: str, progress: bool,
    ) -> np.ndarray:
        n = self.check_request(n, seed, batch_size, start)
        batch_size = self.work_batch(batch_size)
        auto = decoder == "auto"
        decoder = self._resolve_decoder(decoder, min(n, batch_size))
        self.last_stats = {"decoder": decoder, "passes": [], "forward_passes": 0.0, "parallel_images": 0,
                           "batch_decoders": []}
        h, w, c = self.image_shape
        lab = self.resolve_labels(n, labels, start)
        out = np.zeros((n, h, w, c), dtype=np.uint8)
        with Progress(n * h, "sample", enabled=progress) as bar:
            for a, b in chunks(n, batch_size):
                request = DecodeRequest(uniforms(seed, start + a, start + b, (h, w, c)),
                                        None if lab is None else lab[a:b], self.levels,
                                        None if prefix is None else prefix[a:b], rows)
                if auto:
                    out[a:b], used = self._decode_auto(request, bar)
                else:
                    out[a:b], used = self._decode(request, decoder, bar), decoder
                self.last_stats["batch_decoders"].append(used)
        # Which decoders ran, in the order they first did (auto may time both).
        self.last_stats["decoder"] = "+".join(dict.fromkeys(self.last_stats["batch_decoders"])) or decoder
        return out

    def log_prob(
        self, images: np.ndarray, *, labels: np.ndarray | list[int] | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """log p(image) in nats for each image, float64 (N,): a log-probability, so <= 0. The NLL that
        gen-eval reports (``nats_per_image``) is the mean of its negation."""
        check_int("batch_size", batch_size, 1, MAX_INDEX)
        images = self.check_images(images)
        lab = self.resolve_labels(len(images), labels)
        out = np.zeros(len(images), dtype=np.float64)
        for a, b in chunks(len(images), self.work_batch(batch_size)):
            x = images[a:b].transpose(0, 3, 1, 2)  # (B, C, H, W)
            lp = self.forward(x.astype(np.float32), None if lab is None else lab[a:b])  # (B, C, H, W, K)
            picked = np.take_along_axis(lp, x[..., None].astype(np.int64), axis=-1)[..., 0]
            out[a:b] = picked.astype(np.float64).reshape(b - a, -1).sum(axis=1)
        return out


class LatentSampler(Sampler):
    """Samples, encodes, decodes and interpolates with an autoencoder or VAE bundle.

    Images come out as uint8 levels. ``mode="mean"`` (default) shows each sub-pixel's expected level under
    p(x|z) (the reconstruction, for an autoencoder); ``mode="sample"`` draws it, with uniforms from
    (seed, image index) on a stream of their own.
    """

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        super().__init__(bundle, backend)
        self.latent_size = int(bundle.manifest["latent_size"])
        prior = bundle.manifest.get("prior") or {}
        self.prior_mean = np.asarray(prior.get("mean", np.zeros(self.latent_size)), dtype=np.float64)
        self.prior_std = np.asarray(prior.get("std", np.ones(self.latent_size)), dtype=np.float64)
        self.is_vae = any(o["name"] == "log_probs" for o in bundle.graph("decode", bundle.formats[0]).outputs)

    def _feed(self, name: str, value: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(value, dtype=np.float32)}
        if labels is not None:
            feed["labels"] = labels
        return feed

    def encode(
        self, images: np.ndarray, *, labels: np.ndarray | list[int] | None = None, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mean, log-variance) of q(z|x), each float32 (N, Z); an autoencoder's log-variance is zero."""
        check_int("batch_size", batch_size, 1, MAX_INDEX)
        images = self.check_images(images)
        lab = self.resolve_labels(len(images), labels)
        means, logvars = [], []
        for a, b in chunks(len(images), self.work_batch(batch_size)):
            x = images[a:b].transpose(0, 3, 1, 2)
            out = self.backend.run("encode", self._feed("x", x, None if lab is None else lab[a:b]))
            means.append(out[0])
            logvars.append(out[1] if len(out) > 1 else np.zeros_like(out[0]))
        return np.concatenate(means), np.concatenate(logvars)

    def decode(
        self, z: np.ndarray, *, labels: np.ndarray | list[int] | None = None, batch_size: int = 64,
        mode: str = "mean", seed: int = 0, start: int = 0,
    ) -> np.ndarray:
        """Latents (N, Z) -> uint8 levels (N, H, W, C)."""
        if mode not in LATENT_MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(LATENT_MODES)}")
        check_int("seed", seed, 0, MAX_SEED)
        check_int("start", start, 0, MAX_INDEX)
        check_int("batch_size", batch_size, 1, MAX_INDEX)
        z = as_latents(z, self.latent_size)
        # A VAE's decode graph returns per-level float32 log-probabilities for every sub-pixel of a batch.
        self.check_memory(len(z), batch_size, 4 * self.levels + 16)
        lab = self.resolve_labels(len(z), labels, start)
        h, w, c = self.image_shape
        out = np.zeros((len(z), h, w, c), dtype=np.uint8)
        for a, b in chunks(len(z), self.work_batch(batch_size)):
            res = self.backend.run("decode", self._feed("z", z[a:b], None if lab is None else lab[a:b]))[0]
            if not self.is_vae:
                out[a:b] = levels_from_mean(res, self.levels)
                continue
            u = uniforms(seed, start + a, start + b, (h, w, c), stream=1) if mode == "sample" else None
            out[a:b] = levels_from_log_probs(res, mode, u)
        return out

    def sample(
        self, n: int, *, seed: int = 0, batch_size: int = 64, labels: np.ndarray | list[int] | None = None,
        start: int = 0, mode: str = "mean", progress: bool = False,
    ) -> np.ndarray:
        """n images from z = mean + std * eps, eps ~ N(0, I) drawn from (seed, start + i): (n, H, W, C)."""
        n = self.check_request(n, seed, batch_size, start)
        if mode not in LATENT_MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(LATENT_MODES)}")
        eps = normals(seed, start, start + n, self.latent_size) if n else np.zeros((0, self.latent_size))
        z = self.prior_mean + self.prior_std * eps
        with Progress(n, "sample", enabled=progress) as bar:
            out = self.decode(z, labels=labels, batch_size=batch_size, mode=mode, seed=seed, start=start)
            bar.update(n)
        return out

    def reconstruct(
        self, images: np.ndarray, *, labels: np.ndarray | list[int] | None = None, batch_size: int = 64
    ) -> np.ndarray:
        mean, _ = self.encode(images, labels=labels, batch_size=batch_size)
        return self.decode(mean, labels=labels, batch_size=batch_size)

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, steps: int = 8, *, labels: np.ndarray | list[int] | None = None
    ) -> np.ndarray:
        """Decoded points on the line between the codes of a and b: (N, steps, H, W, C) for N pairs."""
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 3:
            a, b = a[None], b[None]
        if a.shape != b.shape:
            raise InputError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
        check_int("steps", steps, 2, MAX_INDEX)
        self.check_memory(len(a) * int(steps), 64, 4 * self.levels + 16)
        lab = self.resolve_labels(len(a), labels)
        za, _ = self.encode(a, labels=lab)
        zb, _ = self.encode(b, labels=lab)
        t = np.linspace(0.0, 1.0, steps)[None, :, None]
        path = (za[:, None] * (1 - t) + zb[:, None] * t).reshape(-1, self.latent_size)
        rep = None if lab is None else np.repeat(lab, steps)
        h, w, c = self.image_shape
        return self.decode(path, labels=rep).reshape(len(a), steps, h, w, c)


class GANSampler(Sampler):
    """Samples a GAN bundle's generator: z ~ N(0, I) from (seed, image index), images as uint8 levels."""

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        super().__init__(bundle, backend)
        self.latent_size = int(bundle.manifest["latent_size"])

    def generate(
        self, z: np.ndarray, *, labels: np.ndarray | list[int] | None = None, batch_size: int = 64, start: int = 0
    ) -> np.ndarray:
        check_int("start", start, 0, MAX_INDEX)
        check_int("batch_size", batch_size, 1, MAX_INDEX)
        z = as_latents(z, self.latent_size).astype(np.float32)
        self.check_memory(len(z), batch_size, 16)
        lab = self.resolve_labels(len(z), labels, start)
        h, w, c = self.image_shape
        out = np.zeros((len(z), h, w, c), dtype=np.uint8)
        for a, b in chunks(len(z), self.work_batch(batch_size)):
            feed = {"z": np.ascontiguousarray(z[a:b])}
            if lab is not None:
                feed["labels"] = lab[a:b]
            out[a:b] = levels_from_mean(self.backend.run("generate", feed)[0], self.levels)
        return out

    def sample(
        self, n: int, *, seed: int = 0, batch_size: int = 64, labels: np.ndarray | list[int] | None = None,
        start: int = 0, progress: bool = False,
    ) -> np.ndarray:
        n = self.check_request(n, seed, batch_size, start)
        z = normals(seed, start, start + n, self.latent_size) if n else np.zeros((0, self.latent_size))
        with Progress(n, "sample", enabled=progress) as bar:
            out = self.generate(z, labels=labels, batch_size=batch_size, start=start)
            bar.update(n)
        return out
