"""The autoregressive decoding loops, written once for every backend.

Three methods, one order (raster over pixels, R -> G -> B within a pixel) and one sampling rule (inverse-CDF
with one pre-drawn uniform per sub-pixel, see randomness.py), hence the same images:
- naive: ``forward(x, labels) -> log_probs`` (x float32 (B, C, H, W) levels, log_probs (B, C, H, W, K)),
  one full forward pass per sub-pixel;
- cached: a ``Stepper`` (the model's incremental form, models/incremental.py) that computes per sub-pixel
  only what that sub-pixel changes;
- parallel: the full forward pass iterated to its fixed point, every sub-pixel redrawn per iteration;
- windowed parallel: the same iteration over a few rows at a time, from the first sub-pixel not yet final, with
  the rows above held in the cached form's caches (``window`` graphs, PixelCNN and Gated PixelCNN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from .progress import Progress

ForwardFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
# (x_rows (B, C, K, W) levels, advance, caches, labels) -> (log_probs (B, C, K, W, levels), caches): the
# window graph (docs/bundle.md, "Windowed parallel decoding").
WindowFn = Callable[[np.ndarray, int, list, "np.ndarray | None"], tuple[np.ndarray, list]]

# A window's depth in rows, from the first unfinished one's row down: too few and a pass finalises little (more
# passes), too many and each pass computes rows that later passes redo. The fastest depth at batch 16 in
# benchmarks/decoding.py's sweep (JSON: window_rows_sweep_onnx_trained; tests/test_policy.py checks it).
WINDOW_DEPTH = 3


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
    bar: Progress | None = None,
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
        if bar is not None:
            bar.update(b)  # images x rows
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
    bar: Progress | None = None,
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
        if bar is not None:
            bar.update(b)
    return _finish(x, levels)


def split_cached_decode(
    steppers: Sequence[Stepper],
    u: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    levels: int,
    prefix: np.ndarray | None = None,
    start_row: int = 0,
    bar: Progress | None = None,
) -> np.ndarray:
    """``cached_decode`` with the batch split into ``len(steppers)`` slices decoded at once, one thread and one
    stepper (its own caches) each: images are independent, and onnxruntime releases the GIL while a graph
    runs, so single-threaded step graphs use one core per slice."""
    if len(steppers) == 1:
        return cached_decode(steppers[0], u, labels=labels, levels=levels, prefix=prefix, start_row=start_row,
                             bar=bar)
    bounds = np.linspace(0, len(u), len(steppers) + 1).astype(int)
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    with ThreadPoolExecutor(len(steppers)) as pool:
        done = [pool.submit(cached_decode, st, u[sl], labels=None if labels is None else labels[sl], levels=levels,
                            prefix=None if prefix is None else prefix[sl], start_row=start_row, bar=bar)
                for st, sl in zip(steppers, slices, strict=True)]
        return np.concatenate([f.result() for f in done])


def parallel_decode(
    forward: ForwardFn,
    u: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    levels: int,
    prefix: np.ndarray | None = None,
    start_row: int = 0,
    bar: Progress | None = None,
    stats: dict | None = None,
) -> np.ndarray:
    """Generate images by fixed-point iteration of the full forward pass (Song et al. 2021, "Accelerating
    Feedforward Computation via Parallel Nonlinear Equation Solving"; Wiggers & Hoogeboom 2020).

    With the uniforms drawn up front, the sample is the fixed point of x = g(forward(x), u), and the dependency
    is strictly triangular in raster order: each iteration draws every sub-pixel from the current image, and
    every sub-pixel before the first one that changed is final (it was drawn from final sub-pixels alone). So
    the iteration reaches naive decoding's images exactly, in at most one iteration per sub-pixel, and in
    practice in far fewer (a trained model predicts most sub-pixels from the ones before them whatever is
    after). An image leaves the batch once an iteration changes nothing. Same arguments and result as
    ``naive_decode``; ``stats`` (if given) receives ``passes`` (forward calls, each over the batch's unfinished
    images) and ``forward_passes_per_image`` (image-forward passes spent per image).
    """
    b, h, w, c = u.shape
    x = _start_image(u, prefix, start_row)
    u_chw = u.transpose(0, 3, 1, 2)[:, :, start_row:]  # (B, C, H', W) to match log_probs
    active = np.arange(b)
    passes = image_passes = 0
    limit = (h - start_row) * w * c + 1  # the triangular structure's bound; more means the model is not causal
    while active.size:
        if passes == limit:
            raise RuntimeError("parallel decoding did not converge: the forward graph is not causal")
        lp = forward(x[active], None if labels is None else labels[active])  # (B', C, H, W, K)
        passes += 1
        image_passes += active.size
        new = inverse_cdf(lp[:, :, start_row:], u_chw[active]).astype(np.float32)  # (B', C, H', W)
        changed = _raster(new != x[active, :, start_row:]).any(axis=1)
        x[active[changed], :, start_row:] = new[changed]
        if bar is not None and (~changed).any():
            bar.update(int((~changed).sum()) * h)
        active = active[changed]
    if stats is not None:
        stats.update(passes=passes, forward_passes_per_image=image_passes / max(b, 1))
    return _finish(x, levels)


def window_decode(
    window: WindowFn,
    caches: list,
    u: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    levels: int,
    prefix: np.ndarray | None = None,
    start_row: int = 0,
    depth: int = WINDOW_DEPTH,
    grow: bool = True,
    bar: Progress | None = None,
    stats: dict | None = None,
) -> np.ndarray:
    """Parallel decoding over a window of rows: the fixed-point iteration of ``parallel_decode``, each pass
    computing only the rows from the first sub-pixel not yet final down ``depth`` rows, the rows above coming
    from the caches (``caches``: the cached form's, as its ``row`` graph leaves them at row 0).

    Each image keeps its frontier f, the number of sub-pixels (raster order) known final. A pass redraws the
    sub-pixels from f on in the window; the first that changes, say q, was drawn from final sub-pixels alone,
    so q + 1 are final after it (all of the window's, if none changed): at least one more sub-pixel per pass,
    as in the full iteration, but a pass costs a few rows instead of the image. The caches move down to the
    first unfinished row of the batch as rows become final, so they only ever hold final rows. Sub-pixels
    before a frontier are never written again. With ``grow``, a pass that finds its whole window final doubles
    the next window's depth (back to ``depth`` after any change): fewer passes over predictable rows. Same
    arguments and result as ``naive_decode``; ``stats`` receives ``passes`` and
    ``forward_passes_per_image`` (rows computed / image height, per image).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    b, h, w, c = u.shape
    x = _start_image(u, prefix, start_row)
    u_chw = u.transpose(0, 3, 1, 2)  # (B, C, H, W) to match log_probs
    per_row = w * c
    final = np.full(b, start_row * per_row)  # per image: sub-pixels known final, in raster order
    active = np.arange(b if start_row < h else 0)
    top = 0  # the row the caches stand at
    passes = 0
    rows_run = 0.0
    window_depth = depth
    while active.size:
        first = int(final[active].min()) // per_row  # the first row with an unfinished sub-pixel
        end = min(h, first + window_depth)
        advance = first - top  # rows above ``first`` are final: the caches may move down to it
        lp, caches = window(np.ascontiguousarray(x[active, :, top:end]), advance,
                            caches, None if labels is None else labels[active])
        passes += 1
        rows_run += (end - top) * active.size
        top = first
        span = (end - first) * per_row
        drawn = inverse_cdf(lp[:, :, advance:], u_chw[active, :, first:end]).astype(np.float32)  # (B', C, rows, W)
        old = _raster(x[active, :, first:end])
        new = _raster(drawn)
        settled = final[active] - first * per_row  # (B',) sub-pixels of the window already final
        open_ = np.arange(span)[None, :] >= settled[:, None]
        changed = (new != old) & open_
        new = np.where(open_, new, old)
        x[active, :, first:end] = new.reshape(active.size, end - first, w, c).transpose(0, 3, 1, 2)
        hit = changed.any(axis=1)
        final[active] = np.where(hit, first * per_row + changed.argmax(axis=1) + 1,
                                 np.maximum(final[active], end * per_row))
        # A window that came out final everywhere says the model predicts these rows from the ones above
        # (blank margins, a model that barely reads its input): look twice as far ahead next pass.
        window_depth = min(h, window_depth * 2) if grow and not hit.any() else depth
        done = final[active] >= h * per_row
        if done.any():
            if bar is not None:
                bar.update(int(done.sum()) * h)
            active = active[~done]
            caches = [cache[~done] for cache in caches]
    if stats is not None:
        stats.update(passes=passes, forward_passes_per_image=rows_run / h / max(b, 1))
    return _finish(x, levels)


def _raster(x: np.ndarray) -> np.ndarray:
    """(B, C, R, W) -> (B, R * W * C) in raster order (row, column, channel)."""
    return x.transpose(0, 2, 3, 1).reshape(len(x), -1)


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
