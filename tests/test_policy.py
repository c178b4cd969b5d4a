"""decoder="auto"'s thresholds (runtime/policy.py) and WINDOW_DEPTH (runtime/decoding.py) against the committed
benchmark run, benchmarks/results/decoding-cpu.json (issue 26, item 3): the comments name the mechanism and the
JSON key, the figures live in the file, and a threshold that the committed run contradicts fails here. After a
new run of benchmarks/decoding.py, either the thresholds still hold or this says which to move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genforge.runtime.decoding import WINDOW_DEPTH
from genforge.runtime.policy import (
    CACHED_THREAD_MIN_IMAGES,
    PARALLEL_MAX_BATCH,
    TUNE_MAX_BATCH,
    WINDOW_PARALLEL_MAX_BATCH,
    cached_threads,
)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "decoding-cpu.json"
# Windowed parallel decoding is the rule's pick only where it beat cached decoding by this much on every model.
CLEAR_WIN = 1.3


@pytest.fixture(scope="module")
def run() -> dict:
    return json.loads(RESULTS.read_text())


def _rows(run: dict, backend: str) -> list[dict]:
    rows = [r for r in run["rows"] if r["backend"] == backend]
    assert rows, f"no {backend} rows in {RESULTS.name}"
    return rows


def test_the_committed_run_used_these_thresholds(run: dict) -> None:
    assert run["window_parallel_max_batch_for_auto"] == WINDOW_PARALLEL_MAX_BATCH
    assert run["parallel_max_batch_for_auto"] == PARALLEL_MAX_BATCH
    assert run["all_decoders_equal"] == {"trained": True, "random": True}


@pytest.mark.parametrize("backend", sorted(WINDOW_PARALLEL_MAX_BATCH))
def test_window_parallel_max_batch_is_where_parallel_stops_winning_clearly(run: dict, backend: str) -> None:
    """Up to the threshold windowed parallel decoding beat cached by CLEAR_WIN or more on every model; at the
    next measured batch it did not on some model (so the threshold is not set too low either)."""
    most = WINDOW_PARALLEL_MAX_BATCH[backend]
    rows = _rows(run, backend)
    below = [r for r in rows if r["batch"] <= most]
    assert below and all(r["parallel_vs_cached"] >= CLEAR_WIN for r in below), [
        (r["model"], r["batch"], round(r["parallel_vs_cached"], 2)) for r in below]
    above = min(r["batch"] for r in rows if r["batch"] > most)
    assert any(r["parallel_vs_cached"] < CLEAR_WIN for r in rows if r["batch"] == above)


@pytest.mark.parametrize("backend", sorted(WINDOW_PARALLEL_MAX_BATCH))
def test_above_the_tuned_range_cached_decoding_was_faster_everywhere(run: dict, backend: str) -> None:
    """auto times both decoders up to TUNE_MAX_BATCH; above it cached won on every model, and the range covers
    every batch where parallel won on some model."""
    rows = _rows(run, backend)
    assert all(r["parallel_vs_cached"] < 1 for r in rows if r["batch"] > TUNE_MAX_BATCH)
    assert max(r["batch"] for r in rows if r["parallel_vs_cached"] > 1) <= TUNE_MAX_BATCH
    # ... and inside it the faster one depends on the model at some batch: the reason to time at all.
    tuned = {r["batch"] for r in rows if WINDOW_PARALLEL_MAX_BATCH[backend] < r["batch"] <= TUNE_MAX_BATCH}
    assert any(len({r["parallel_vs_cached"] > 1 for r in rows if r["batch"] == b}) == 2 for b in tuned)


def test_forward_parallel_decoding_wins_on_onnx_up_to_its_threshold(run: dict) -> None:
    """Whole-forward parallel decoding on ONNX, trained model: faster than cached up to PARALLEL_MAX_BATCH,
    slower at the next measured batch."""
    rows = [r for r in _rows(run, "onnx") if r["model"] == "trained" and r.get("parallel_forward_vs_cached")]
    assert all(r["parallel_forward_vs_cached"] > 1 for r in rows if r["batch"] <= PARALLEL_MAX_BATCH)
    above = min(r["batch"] for r in rows if r["batch"] > PARALLEL_MAX_BATCH)
    assert all(r["parallel_forward_vs_cached"] < 1 for r in rows if r["batch"] == above)


def test_window_rows_is_the_fastest_depth_at_batch_16(run: dict) -> None:
    """WINDOW_DEPTH: the fastest window depth of the sweep at batch 16, where auto runs windowed decoding on its
    tuned batches (batch 1 is in the sweep too; there the depths are closer and their order changes between
    runs)."""
    sweep = [r for r in run["window_rows_sweep_onnx_trained"] if r["batch"] == 16]
    assert min(sweep, key=lambda r: r["seconds"])["rows"] == WINDOW_DEPTH


def test_cached_decoding_split_between_threads_where_it_paid(run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the committed run split cached ONNX decoding between threads (CACHED_THREAD_MIN_IMAGES images a
    thread or more, on its cores), the split beat one thread; every batch below the threshold ran on one."""
    import genforge.runtime.policy as policy

    cores = run["device"]["cpu_count"]
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    rows = _rows(run, "onnx")
    split = [r for r in rows if r.get("cached_threads", 1) > 1]
    assert split and all(r["cached_split_vs_one_thread"] > 1 for r in split)
    for r in rows:
        assert r.get("cached_threads", 1) == cached_threads(r["batch"], "onnx", "cpu"), r["batch"]
    assert min(r["batch"] for r in split) >= cores * CACHED_THREAD_MIN_IMAGES
