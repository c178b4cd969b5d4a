"""decoder="auto": which decoder a batch gets. The rule (``auto_decoder``) reads the batch size, the device
and what the bundle has; where the measured margins are thin, ``DecoderTuner`` times the two candidates on
real batches. The thresholds come from benchmarks/decoding.py on a trained and a random-weight 64x8 PixelCNN;
the committed run is benchmarks/results/decoding-cpu.json, and tests/test_policy.py checks each threshold
against it (the JSON keys are named beside each constant). Mechanisms here, figures there."""

from __future__ import annotations

import os

# Whole-forward parallel decoding (bundles without a window graph: the PixelRNNs) costs passes x a whole
# forward pass, against cached decoding's ~100 tiny operations per sub-pixel whatever the batch: it wins at the
# smallest batches on ONNX only. JSON: rows[].parallel_forward_vs_cached (backend "onnx", model "trained").
PARALLEL_MAX_BATCH = 1
# Windowed parallel decoding (the PixelCNNs' window graph) costs passes x a few rows of the batch, so it wins
# at small batches: up to this batch it beat cached decoding clearly on both models (tests/test_policy.py's
# CLEAR_WIN). JSON: rows[].parallel_vs_cached, and window_parallel_max_batch_for_auto (what the run used).
WINDOW_PARALLEL_MAX_BATCH = {"onnx": 8, "torchscript": 8}

# Cached decoding on a backend whose step graphs run single-threaded (Backend.splits_cached_batch_on) splits a
# batch between threads, one per core, once each thread gets this many images: below it the threads' start
# and synchronisation cost more than the second core gives. JSON: rows[].cached_split_vs_one_thread, where
# the committed run split (batch 256 on 2 cores).
CACHED_THREAD_MIN_IMAGES = 128

# Above WINDOW_PARALLEL_MAX_BATCH and up to this batch, which of windowed parallel and cached decoding is
# faster depends on the model (a trained PixelCNN needs several times the passes of a random one), so auto
# times both; above it cached decoding was faster for every model and backend. JSON: rows[].parallel_vs_cached.
TUNE_MAX_BATCH = 128
# The slower of the two is timed again every TUNE_RETRY batches of a shape: one slow spell of the machine
# (seen here to move a timing 2-3x) must not settle the choice for good.
TUNE_RETRY = 16


class DecoderTuner:
    """Picks the faster of two decoders per batch shape by timing real batches (the images are the same
    whichever runs). The first batch of a shape runs ``first`` (the rule's pick), the second ``other``, later
    ones the faster so far, except that every ``retry``-th re-times the slower."""

    def __init__(self, retry: int = TUNE_RETRY) -> None:
        self.retry = retry
        self.seconds: dict[tuple, dict[str, float]] = {}
        self.batches: dict[tuple, int] = {}

    def faster(self, key: tuple) -> str | None:
        """The faster decoder by the latest timings of ``key``, or None before any."""
        timed = self.seconds.get(key)
        return min(timed, key=timed.__getitem__) if timed else None

    def choose(self, key: tuple, first: str, other: str) -> str:
        timed = self.seconds.get(key, {})
        if first not in timed:
            return first
        if other not in timed:
            return other
        faster = self.faster(key)
        return (other if faster == first else first) if self.batches[key] % self.retry == 0 else faster

    def record(self, key: tuple, decoder: str, seconds: float) -> None:
        self.seconds.setdefault(key, {})[decoder] = seconds
        self.batches[key] = self.batches.get(key, 0) + 1


def backend_type(backend: str) -> type:
    """The backend class behind a backend name (its policy attributes, without constructing one)."""
    from .backends import OnnxBackend, TorchScriptBackend

    if backend == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend
    return {"onnx": OnnxBackend, "torchscript": TorchScriptBackend}[backend]


def cached_threads(batch: int, backend: str, device: str) -> int:
    """How many threads cached decoding of ``batch`` images splits the batch between."""
    if not backend_type(backend).splits_cached_batch_on(device):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, batch // CACHED_THREAD_MIN_IMAGES))


def auto_decoder(available: list[str], batch: int, backend: str, device: str, *, windowed: bool = False) -> str:
    """The decoder ``decoder="auto"`` runs for a batch by the measured rule (the sampler's tuner may then
    time the other, see ``TUNE_MAX_BATCH``); ``windowed``: the bundle has a window graph for ``backend``."""
    if "parallel" in available and device == "cpu":
        if windowed and batch <= WINDOW_PARALLEL_MAX_BATCH.get(backend, 0):
            return "parallel"
        if not windowed and batch <= FORWARD_PARALLEL_MAX_BATCH.get(backend, 0):
            return "parallel"
    return "cached" if "cached" in available else "naive"


# Per backend: the forward graph's speed decides it, and TorchScript's was ~4x slower than onnxruntime's on the
# PixelRNNs the rule was set on.
FORWARD_PARALLEL_MAX_BATCH = {"onnx": PARALLEL_MAX_BATCH}


def tuned(batch: int, backend: str, device: str, *, windowed: bool, candidates: set[str]) -> bool:
    """Whether decoder="auto" times windowed parallel against cached decoding for this batch."""
    return (device == "cpu" and windowed and {"cached", "parallel"} <= candidates
            and WINDOW_PARALLEL_MAX_BATCH.get(backend, 0) < batch <= TUNE_MAX_BATCH)
