"""Parallel (fixed-point) decoding: the same images as naive and cached decoding, on every autoregressive
family, both exported backends, labels, colour and completion; a property test on random causal models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AUTOREGRESSIVE
from hypothesis import given, settings
from hypothesis import strategies as st

from genforge.runtime import load
from genforge.runtime.decoding import naive_decode, parallel_decode
from genforge.runtime.sampler import (
    PARALLEL_MAX_BATCH,
    TUNE_MAX_BATCH,
    WINDOW_PARALLEL_MAX_BATCH,
    DecoderTuner,
    auto_decoder,
)


@pytest.mark.parametrize("name", AUTOREGRESSIVE)
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_parallel_decoding_draws_the_cached_images(family_bundles, name: str, backend: str, fresh_seed: int) -> None:
    s = load(family_bundles[name], backend=backend, device="cpu")
    want = s.sample(5, seed=fresh_seed, decoder="cached", batch_size=3)
    got = s.sample(5, seed=fresh_seed, decoder="parallel", batch_size=3)
    np.testing.assert_array_equal(got, want)
    h, w, c = s.image_shape
    assert s.last_stats["decoder"] == "parallel" and len(s.last_stats["passes"]) == 2  # two batches
    assert all(1 <= it <= h * w * c + 1 for it in s.last_stats["passes"])
    rows = h // 2
    np.testing.assert_array_equal(s.complete(want[::-1], rows, seed=fresh_seed + 1, decoder="parallel"),
                                  s.complete(want[::-1], rows, seed=fresh_seed + 1, decoder="cached"))


@pytest.mark.slow
def test_parallel_equals_naive_on_the_same_forward(family_bundles, fresh_seed: int) -> None:
    s = load(family_bundles["pixelcnn-rgb"], backend="onnx", device="cpu")
    u = np.random.default_rng(fresh_seed).random((3, *s.image_shape))
    stats: dict = {}
    got = parallel_decode(s.forward, u, levels=s.levels, stats=stats)
    np.testing.assert_array_equal(got, naive_decode(s.forward, u, levels=s.levels))
    assert stats["passes"] >= 1 and 1 <= stats["forward_passes_per_image"] <= stats["passes"]


def _causal_forward(h: int, w: int, c: int, k: int, seed: int, strength: float):
    """A random model whose logits at raster position p are a linear function of the levels before p."""
    n = h * w * c
    rng = np.random.default_rng(seed)
    weights = np.tril(rng.normal(0, strength, (n, n, k)).transpose(2, 0, 1), k=-1).transpose(1, 2, 0)  # (n, n, k)
    bias = rng.normal(0, 1, (n, k))

    def forward(x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        flat = x.transpose(0, 2, 3, 1).reshape(len(x), n)  # raster order (i, j, c)
        logits = np.einsum("bq,pqk->bpk", flat, weights) + bias
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        return lp.reshape(len(x), h, w, c, k).transpose(0, 3, 1, 2, 4).astype(np.float32)

    return forward


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 4), w=st.integers(1, 4), c=st.sampled_from([1, 3]), k=st.integers(2, 5),
       batch=st.integers(1, 4), seed=st.integers(0, 2**31), strength=st.sampled_from([0.1, 1.0, 5.0]),
       start_row=st.integers(0, 4))
def test_parallel_decoding_reaches_the_naive_fixed_point(h, w, c, k, batch, seed, strength, start_row) -> None:
    start_row = min(start_row, h)
    forward = _causal_forward(h, w, c, k, seed, strength)
    rng = np.random.default_rng(seed + 1)
    u = rng.random((batch, h, w, c))
    prefix = rng.integers(0, k, (batch, h, w, c)).astype(np.uint8)
    stats: dict = {}
    got = parallel_decode(forward, u, levels=k, prefix=prefix, start_row=start_row, stats=stats)
    np.testing.assert_array_equal(got, naive_decode(forward, u, levels=k, prefix=prefix, start_row=start_row))
    assert stats["passes"] <= (h - start_row) * w * c + 1


def test_a_forward_that_is_not_causal_is_caught() -> None:
    def anti_causal(x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        # Each sub-pixel copies the opposite of the next one: the iteration never settles.
        nxt = np.roll(x, -1, axis=3)
        logits = np.stack([nxt * 10, (1 - nxt) * 10], axis=-1)
        return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)

    with pytest.raises(RuntimeError, match="not causal"):
        parallel_decode(anti_causal, np.full((1, 2, 4, 1), 0.5), levels=2)


def test_auto_picks_parallel_for_small_cpu_batches_only() -> None:
    have = ["naive", "cached", "graph", "parallel"]
    assert auto_decoder(have, 1, "onnx", "cpu") == "parallel"
    assert auto_decoder(have, PARALLEL_MAX_BATCH, "onnx", "cpu") == "parallel"
    assert auto_decoder(have, 1, "torchscript", "cpu") == "cached"  # its forward pass is ~4x slower
    assert auto_decoder(have, PARALLEL_MAX_BATCH + 1, "onnx", "cpu") == "cached"
    assert auto_decoder(have, 1, "onnx", "cuda") == "cached"
    assert auto_decoder(["naive", "parallel"], 64, "onnx", "cpu") == "naive"
    # With a window graph, parallel up to its own measured batch size, on both CPU backends.
    for backend in ("onnx", "torchscript"):
        most = WINDOW_PARALLEL_MAX_BATCH[backend]
        assert auto_decoder(have, most, backend, "cpu", windowed=True) == "parallel"
        assert auto_decoder(have, most + 1, backend, "cpu", windowed=True) == "cached"
        assert auto_decoder(have, 1, backend, "cuda", windowed=True) == "cached"


def test_the_tuner_times_both_then_runs_the_faster_and_retimes_the_slower() -> None:
    tuner = DecoderTuner(retry=4)
    key, other_key = (32, 0, False), (64, 0, False)
    seconds = {"cached": 0.5, "parallel": 0.2}
    ran = []
    for _ in range(10):
        decoder = tuner.choose(key, "cached", "parallel")
        ran.append(decoder)
        tuner.record(key, decoder, seconds[decoder])
    # The rule's pick, the other, then the faster, the slower again at every 4th batch.
    assert ran == ["cached", "parallel", "parallel", "parallel", "cached", "parallel", "parallel", "parallel",
                   "cached", "parallel"]
    assert tuner.choose(other_key, "cached", "parallel") == "cached"  # each shape is timed on its own
    # The latest timing counts: a decoder that got slower loses its place.
    tuner.record(key, "parallel", 0.9)
    assert tuner.choose(key, "cached", "parallel") == "cached"


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_auto_times_parallel_against_cached_where_the_rule_is_unsure(family_bundles, backend, fresh_seed) -> None:
    s = load(family_bundles["pixelcnn"], backend=backend, device="cpu")
    batch = WINDOW_PARALLEL_MAX_BATCH[backend] + 1
    assert batch <= TUNE_MAX_BATCH
    want = s.sample(3 * batch, seed=fresh_seed, decoder="cached", batch_size=batch)
    # The third batch's own timing replaces its decoder's, so what chose it is the timings before it ran.
    seen = []
    choose = s.tuner.choose
    def spy(key: tuple, first: str, other: str) -> str:
        seen.append(dict(s.tuner.seconds.get(key, {})))
        return choose(key, first, other)
    s.tuner.choose = spy
    got = s.sample(3 * batch, seed=fresh_seed, decoder="auto", batch_size=batch)
    np.testing.assert_array_equal(got, want)
    first, second, third = s.last_stats["batch_decoders"]
    assert (first, second) == ("cached", "parallel") and s.last_stats["decoder"] == "cached+parallel"
    assert len(seen) == 3 and set(seen[2]) == {"cached", "parallel"}
    assert third == min(seen[2], key=seen[2].__getitem__)
    assert s.tuner.seconds[(batch, 0, False)][third] > 0  # the third batch was timed too
    # Small and large batches follow the rule untimed.
    s.sample(2, seed=fresh_seed, decoder="auto", batch_size=2)
    assert s.last_stats["batch_decoders"] == ["parallel"]
    s.sample(TUNE_MAX_BATCH + 1, seed=fresh_seed, decoder="auto", batch_size=TUNE_MAX_BATCH + 1)
    assert s.last_stats["batch_decoders"] == ["cached"]
    assert set(s.tuner.seconds) == {(batch, 0, False)}
